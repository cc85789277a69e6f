//! A bounded, priority-ordered async queue: higher priority first, FIFO within one priority.
//!
//! Used for every per-peer outbound queue and for the inbox behind
//! [`Node::receive`](crate::Node::receive). Producers either wait for room or get
//! [`PushError::Full`], by the caller's choice; a closed queue refuses pushes and drains.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::sync::Notify;

/// Why a push failed.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError<T> {
    /// The queue is at capacity (only from [`BoundedQueue::try_push`]).
    Full(T),
    /// The queue was closed.
    Closed(T),
}

struct State<T> {
    /// One FIFO per priority level in use; `levels` keeps the non-empty levels sorted.
    fifos: Vec<VecDeque<T>>,
    /// Non-empty priority levels, highest last.
    levels: Vec<u8>,
    len: usize,
    /// Items a consumer took in one go with [`BoundedQueue::take_lending`] and holds in its
    /// stash: they still count against the capacity until it releases them, so the queue and
    /// the consumer's stash together never hold more than the bound.
    lent: usize,
    closed: bool,
}

impl<T> State<T> {
    // Inlined: an item moved through a call is copied at each level (a message is ~200
    // bytes), and these run once per message on every queue.
    #[inline(always)]
    fn push(&mut self, prio: u8, item: T) {
        let fifo = &mut self.fifos[prio as usize];
        if fifo.is_empty() {
            match self.levels.binary_search(&prio) {
                Ok(_) => {}
                Err(pos) => self.levels.insert(pos, prio),
            }
        }
        fifo.push_back(item);
        self.len += 1;
    }

    /// Moves up to `max` items, highest priority first, to `out`: each item is moved once (a
    /// `pop` then `push` moves it twice, a ~200-byte copy each for a message).
    #[inline(always)]
    fn pop_into(&mut self, max: usize, out: &mut Vec<T>) {
        let mut left = max;
        while left > 0 {
            let Some(&prio) = self.levels.last() else { break };
            let fifo = &mut self.fifos[prio as usize];
            let n = left.min(fifo.len());
            out.extend(fifo.drain(..n));
            left -= n;
            self.len -= n;
            if fifo.is_empty() {
                self.levels.pop();
            }
        }
    }

    #[inline(always)]
    fn pop(&mut self) -> Option<T> {
        let &prio = self.levels.last()?;
        let fifo = &mut self.fifos[prio as usize];
        let item = fifo.pop_front();
        if fifo.is_empty() {
            self.levels.pop();
        }
        if item.is_some() {
            self.len -= 1;
        }
        item
    }
}

/// A bounded multi-producer queue ordered by priority (0..=255, higher first).
pub struct BoundedQueue<T> {
    state: Mutex<State<T>>,
    capacity: usize,
    /// Pushers waiting for room: pops notify only when there are some (a `notify_waiters`
    /// takes a lock even when nobody waits).
    push_waiters: AtomicUsize,
    /// The length and the highest priority waiting as of the last operation, readable
    /// without the lock (a hint: exact only under the lock): `len << 10 | closed << 9 | top`,
    /// where `top` is 0 for an empty queue and the priority plus one otherwise.
    hint: AtomicUsize,
    not_empty: Notify,
    not_full: Notify,
    /// A queue with one usual consumer (the inbox) lets it wait here instead of in
    /// `not_empty`: registering a waker is a few atomic operations, where a `Notify` waiter
    /// takes the waiter list's lock to enable, to poll, and to be woken. Every wake-up of a
    /// consumer wakes both. `None` for a queue without such a consumer (it then costs nothing).
    solo: Option<futures::task::AtomicWaker>,
}

impl<T> std::fmt::Debug for BoundedQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BoundedQueue").field("capacity", &self.capacity).field("len", &self.len()).finish()
    }
}

impl<T> BoundedQueue<T> {
    /// A queue holding at most `capacity` items (at least 1).
    pub fn new(capacity: usize) -> Self {
        BoundedQueue {
            state: Mutex::new(State {
                fifos: (0..256).map(|_| VecDeque::new()).collect(),
                levels: Vec::with_capacity(4),
                len: 0,
                lent: 0,
                closed: false,
            }),
            capacity: capacity.max(1),
            push_waiters: AtomicUsize::new(0),
            hint: AtomicUsize::new(0),
            not_empty: Notify::new(),
            not_full: Notify::new(),
            solo: None,
        }
    }

    /// A queue whose usual single consumer waits with [`register_solo`](Self::register_solo).
    pub fn with_solo_consumer(capacity: usize) -> Self {
        BoundedQueue { solo: Some(futures::task::AtomicWaker::new()), ..Self::new(capacity) }
    }

    /// Registers the waker of the one consumer waiting without `notified` (the caller makes
    /// sure there is one at a time), then the caller looks at the queue again: a push, close
    /// or [`notify_pushed`](Self::notify_pushed) after the registration wakes it. No-op on a
    /// queue made without [`with_solo_consumer`](Self::with_solo_consumer).
    pub fn register_solo(&self, waker: &std::task::Waker) {
        if let Some(solo) = &self.solo {
            solo.register(waker);
        }
    }

    /// Wakes one waiting consumer (and the solo one, if any).
    #[inline(always)]
    fn wake_consumer(&self) {
        if let Some(solo) = &self.solo {
            solo.wake();
        }
        self.not_empty.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        // A panic while holding this lock cannot leave the queue inconsistent (every
        // mutation is a single push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bound.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the queue looked empty after its last operation, without taking the lock (a
    /// hint for fast paths; confirm with [`is_empty`](Self::is_empty) where it matters).
    pub fn looks_empty(&self) -> bool {
        self.hint.load(Ordering::Relaxed) >> 10 == 0
    }

    /// The highest priority waiting as of the last operation, without taking the lock (a
    /// hint, like [`looks_empty`](Self::looks_empty)); `None` if the queue looked empty.
    pub fn top_priority_hint(&self) -> Option<u8> {
        let top = self.hint.load(Ordering::Relaxed) & 0x1ff;
        top.checked_sub(1).map(|p| p as u8)
    }

    /// Publishes the length and top priority for the lock-free hints; called under the lock
    /// after every change.
    #[inline(always)]
    fn publish(&self, st: &State<T>) {
        let top = st.levels.last().map_or(0, |&p| p as usize + 1);
        self.hint.store(st.len << 10 | usize::from(st.closed) << 9 | top, Ordering::Relaxed);
    }

    /// Whether the queue looked closed and drained as of its last operation, without the lock.
    /// A queue seen closed never gains items again, so `true` is final; `false` may be stale.
    pub fn looks_drained(&self) -> bool {
        self.hint.load(Ordering::Relaxed) >> 9 == 1
    }

    /// Pushes without waiting: `Full` at capacity.
    #[inline(always)]
    pub fn try_push(&self, prio: u8, item: T) -> Result<(), PushError<T>> {
        self.try_push_deferred(prio, item)?;
        self.wake_consumer();
        Ok(())
    }

    /// Like [`try_push`](Self::try_push) but wakes no consumer: the caller pushes a run of
    /// items and then calls [`notify_pushed`](Self::notify_pushed) once, so a consumer is woken
    /// once per run instead of once per item.
    #[inline(always)]
    pub fn try_push_deferred(&self, prio: u8, item: T) -> Result<(), PushError<T>> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed(item));
        }
        if st.len + st.lent >= self.capacity {
            return Err(PushError::Full(item));
        }
        st.push(prio, item);
        self.publish(&st);
        Ok(())
    }

    /// Wakes a consumer after [`try_push_deferred`](Self::try_push_deferred) pushes (a
    /// consumer that pops and leaves items behind wakes the next one).
    pub fn notify_pushed(&self) {
        self.wake_consumer();
    }

    /// Pushes even past capacity by up to `slack` items (for small control messages that must
    /// not be blocked behind data); `Full` beyond that.
    pub fn push_with_slack(&self, prio: u8, item: T, slack: usize) -> Result<(), PushError<T>> {
        let mut st = self.lock();
        if st.closed {
            return Err(PushError::Closed(item));
        }
        if st.len + st.lent >= self.capacity + slack {
            return Err(PushError::Full(item));
        }
        st.push(prio, item);
        self.publish(&st);
        drop(st);
        self.wake_consumer();
        Ok(())
    }

    /// Pushes, waiting for room while the queue is full. Fails only when closed.
    pub async fn push(&self, prio: u8, item: T) -> Result<(), PushError<T>> {
        // Fast path: room now, no waiter registration.
        let mut item = match self.try_push(prio, item) {
            Err(PushError::Full(back)) => back,
            other => return other,
        };
        self.push_waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = WaiterGuard(&self.push_waiters);
        loop {
            let notified = self.not_full.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_push(prio, item) {
                Err(PushError::Full(back)) => item = back,
                other => return other,
            }
            notified.await;
        }
    }

    fn wake_pushers(&self) {
        if self.push_waiters.load(Ordering::SeqCst) > 0 {
            self.not_full.notify_waiters();
        }
    }

    /// Moves up to `max` items, highest priority first, into `out`, waiting while the queue is
    /// empty. Returns `false` once the queue is closed and drained.
    pub async fn pop_batch(&self, max: usize, out: &mut Vec<T>) -> bool {
        loop {
            if let Some(got) = self.try_pop_batch(max, out) {
                return got;
            }
            let notified = self.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(got) = self.try_pop_batch(max, out) {
                return got;
            }
            notified.await;
        }
    }

    /// Waits until an item is waiting (`true`) or the queue is closed and drained (`false`),
    /// without taking anything.
    pub async fn wait_ready(&self) -> bool {
        loop {
            {
                let st = self.lock();
                if st.len > 0 {
                    return true;
                }
                if st.closed {
                    return false;
                }
            }
            let notified = self.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                if st.len > 0 {
                    return true;
                }
                if st.closed {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// `Some(true)` if items were moved, `Some(false)` if closed and drained, `None` if empty.
    pub fn try_pop_batch(&self, max: usize, out: &mut Vec<T>) -> Option<bool> {
        let mut st = self.lock();
        if st.len == 0 {
            return st.closed.then_some(false);
        }
        st.pop_into(max.max(1), out);
        let more = st.len > 0;
        self.publish(&st);
        drop(st);
        self.wake_pushers();
        if more {
            // Let another consumer (if any) see the remaining items.
            self.wake_consumer();
        }
        Some(true)
    }

    /// For a consumer that stashes what it takes, with its stash empty: gives back the items
    /// lent by the previous take (all were taken), pops the next item, and moves the rest of
    /// its priority level into `stash` by swapping buffers (no item is copied, however many),
    /// lending them. `Err(closed)` when the queue is empty.
    ///
    /// Lent items count against the capacity until [`release`](Self::release) or the next
    /// take, so the consumer releases them as soon as its stash runs empty.
    pub fn take_lending(&self, stash: &mut VecDeque<T>) -> Result<T, bool> {
        debug_assert!(stash.is_empty(), "a take with items still stashed");
        let mut guard = self.lock();
        let st = &mut *guard;
        let returned = std::mem::take(&mut st.lent);
        let Some(&prio) = st.levels.last() else {
            let closed = st.closed;
            drop(guard);
            if returned > 0 {
                self.wake_pushers();
            }
            return Err(closed);
        };
        let fifo = &mut st.fifos[prio as usize];
        let first = fifo.pop_front().expect("a listed level is not empty");
        std::mem::swap(fifo, stash);
        st.levels.pop();
        st.len -= 1 + stash.len();
        st.lent = stash.len();
        let more = st.len > 0;
        self.publish(st);
        drop(guard);
        // The first item's room is free (and any returned).
        self.wake_pushers();
        if more {
            // Let another consumer (if any) see the remaining items.
            self.wake_consumer();
        }
        Ok(first)
    }

    /// Gives back the room of the items lent by [`take_lending`](Self::take_lending): the
    /// consumer's stash ran empty.
    pub fn release(&self) {
        let returned = std::mem::take(&mut self.lock().lent);
        if returned > 0 {
            self.wake_pushers();
        }
    }

    /// A wake-up for the next push (or close, or [`notify_pushed`](Self::notify_pushed)), for a
    /// consumer that waits in its own way: enable it, look again, then await it.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.not_empty.notified()
    }

    /// Pops one item, waiting while empty; `None` once closed and drained.
    pub async fn pop(&self) -> Option<T> {
        loop {
            match self.try_pop_or_closed() {
                Ok(item) => return Some(item),
                Err(true) => return None,
                Err(false) => {}
            }
            let notified = self.not_empty.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.try_pop_or_closed() {
                Ok(item) => return Some(item),
                Err(true) => return None,
                Err(false) => {}
            }
            notified.await;
        }
    }

    /// An item, or `Err(closed)`.
    #[inline(always)]
    fn try_pop_or_closed(&self) -> Result<T, bool> {
        let mut st = self.lock();
        match st.pop() {
            Some(item) => {
                let more = st.len > 0;
                self.publish(&st);
                drop(st);
                self.wake_pushers();
                if more {
                    self.wake_consumer();
                }
                Ok(item)
            }
            None => Err(st.closed),
        }
    }

    /// Pops the first item of the highest priority waiting, if that priority is above
    /// `floor`; nothing otherwise.
    pub fn try_pop_above(&self, floor: u8) -> Option<T> {
        let item = {
            let mut st = self.lock();
            if st.levels.last().is_none_or(|&top| top <= floor) {
                return None;
            }
            let item = st.pop();
            self.publish(&st);
            item
        };
        if item.is_some() {
            self.wake_pushers();
        }
        item
    }

    /// Pops one item if any is waiting.
    pub fn try_pop(&self) -> Option<T> {
        let item = {
            let mut st = self.lock();
            let item = st.pop();
            self.publish(&st);
            item
        };
        if item.is_some() {
            self.wake_pushers();
        }
        item
    }

    /// Closes the queue: pushes fail, waiting pushers are released, consumers drain what is
    /// left and then see the end.
    pub fn close(&self) {
        {
            let mut st = self.lock();
            st.closed = true;
            self.publish(&st);
        }
        self.not_empty.notify_waiters();
        self.wake_consumer();
        self.not_full.notify_waiters();
    }

    /// True once [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }
}

struct WaiterGuard<'a>(&'a AtomicUsize);

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn priority_then_fifo() {
        let q = BoundedQueue::new(16);
        for (p, v) in [(1, 'a'), (5, 'b'), (1, 'c'), (9, 'd'), (5, 'e')] {
            q.try_push(p, v).unwrap();
        }
        let mut out = Vec::new();
        assert!(q.pop_batch(16, &mut out).await);
        assert_eq!(out, vec!['d', 'b', 'e', 'a', 'c']);
    }

    /// A batch pop takes exactly what as many single pops would, across priority levels and
    /// batch sizes, with pushes in between (levels emptied and used again).
    #[test]
    fn batch_pops_equal_single_pops() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let (batched, single) = (BoundedQueue::new(64), BoundedQueue::new(64));
        let mut counter = 0u32;
        for _ in 0..2_000 {
            if next(3) > 0 {
                let prio = [0u8, 1, 7, 200, 255][next(5) as usize];
                counter += 1;
                let (a, b) = (batched.try_push(prio, counter), single.try_push(prio, counter));
                assert_eq!(a.is_ok(), b.is_ok());
            } else {
                let k = 1 + next(10) as usize;
                let mut got = Vec::new();
                let r = batched.try_pop_batch(k, &mut got);
                let want: Vec<u32> = std::iter::from_fn(|| single.try_pop()).take(k).collect();
                assert_eq!(got, want, "a batch of {k}");
                assert_eq!(r, if want.is_empty() { None } else { Some(true) });
                assert_eq!(batched.len(), single.len());
            }
        }
    }

    /// `try_pop_above` takes only a priority strictly above its floor, and the lock-free
    /// hints follow every push and pop.
    #[test]
    fn pop_above_takes_only_a_higher_priority_and_hints_follow() {
        let q = BoundedQueue::new(8);
        assert_eq!((q.top_priority_hint(), q.looks_empty()), (None, true));
        q.try_push(3, 'a').unwrap();
        q.try_push(3, 'b').unwrap();
        assert_eq!(q.top_priority_hint(), Some(3));
        assert_eq!(q.try_pop_above(3), None, "3 is not above 3");
        assert_eq!(q.try_pop_above(2), Some('a'));
        q.try_push(255, 'c').unwrap();
        q.try_push(0, 'd').unwrap();
        assert_eq!(q.top_priority_hint(), Some(255));
        assert_eq!(q.try_pop_above(254), Some('c'));
        assert_eq!(q.try_pop_above(3), None);
        assert_eq!(q.top_priority_hint(), Some(3));
        assert_eq!(q.try_pop(), Some('b'));
        assert_eq!((q.top_priority_hint(), q.looks_empty()), (Some(0), false));
        assert_eq!(q.try_pop_above(0), None);
        assert_eq!(q.try_pop(), Some('d'));
        assert_eq!((q.top_priority_hint(), q.looks_empty()), (None, true));
        assert!(!q.looks_drained(), "empty, not closed");
        q.try_push(1, 'e').unwrap();
        q.close();
        assert!(!q.looks_drained(), "closed, not drained");
        assert_eq!(q.try_pop(), Some('e'));
        assert!(q.looks_drained());
    }

    #[tokio::test]
    async fn full_at_capacity_and_not_before() {
        let q = BoundedQueue::new(3);
        for i in 0..3 {
            q.try_push(0, i).unwrap();
        }
        assert_eq!(q.try_push(0, 3), Err(PushError::Full(3)));
        assert_eq!(q.push_with_slack(255, 4, 1), Ok(()));
        assert_eq!(q.push_with_slack(255, 5, 1), Err(PushError::Full(5)));
        assert_eq!(q.try_pop(), Some(4));
        assert_eq!(q.len(), 3);
    }

    #[tokio::test]
    async fn waiting_push_resumes_after_pop() {
        let q = Arc::new(BoundedQueue::new(1));
        q.try_push(0, 1).unwrap();
        let q2 = q.clone();
        let pusher = tokio::spawn(async move { q2.push(0, 2).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!pusher.is_finished(), "push must wait while full");
        assert_eq!(q.pop().await, Some(1));
        pusher.await.unwrap().unwrap();
        assert_eq!(q.pop().await, Some(2));
    }

    #[tokio::test]
    async fn close_drains_then_ends_and_releases_pushers() {
        let q = Arc::new(BoundedQueue::new(1));
        q.try_push(0, 1).unwrap();
        let q2 = q.clone();
        let pusher = tokio::spawn(async move { q2.push(0, 2).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.close();
        assert_eq!(pusher.await.unwrap(), Err(PushError::Closed(2)));
        assert_eq!(q.pop().await, Some(1));
        assert_eq!(q.pop().await, None);
        assert_eq!(q.try_push(0, 3), Err(PushError::Closed(3)));
    }

    #[tokio::test]
    async fn deferred_pushes_wake_the_consumer_once_notified() {
        let q = Arc::new(BoundedQueue::new(8));
        let q2 = q.clone();
        let consumer = tokio::spawn(async move { (q2.pop().await, q2.pop().await, q2.pop().await) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        q.try_push_deferred(0, 1).unwrap();
        q.try_push_deferred(0, 2).unwrap();
        q.try_push_deferred(0, 3).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!consumer.is_finished(), "a deferred push must not wake the consumer");
        q.notify_pushed();
        let got = tokio::time::timeout(Duration::from_secs(5), consumer).await.expect("woken").unwrap();
        assert_eq!(got, (Some(1), Some(2), Some(3)));
        // The bound holds for deferred pushes too.
        let q = BoundedQueue::new(1);
        q.try_push_deferred(0, 1).unwrap();
        assert_eq!(q.try_push_deferred(0, 2), Err(PushError::Full(2)));
    }

    /// No wake-up is lost: producers using every push flavour race a consumer using one of the waits (`pop`,
    /// `pop_batch`, `wait_ready`, in turn) on four threads around a small queue, many times;
    /// every item arrives exactly once within a deadline (a lost wake-up leaves the consumer
    /// asleep beside items).
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn no_wake_up_is_lost_between_racing_pushers_and_waiting_consumers() {
        const PRODUCERS: usize = 3;
        const PER_PRODUCER: usize = 3_000;
        for round in 0..30 {
            let q = Arc::new(BoundedQueue::new(4));
            let mut producers = Vec::new();
            for p in 0..PRODUCERS {
                let q = q.clone();
                producers.push(tokio::spawn(async move {
                    for i in 0..PER_PRODUCER {
                        let item = p * PER_PRODUCER + i;
                        match (i + round) % 4 {
                            0 => q.push(0, item).await.unwrap(),
                            1 => {
                                let mut item = item;
                                loop {
                                    match q.try_push_deferred((i % 3) as u8, item) {
                                        Ok(()) => break,
                                        Err(PushError::Full(back)) => {
                                            item = back;
                                            q.notify_pushed();
                                            tokio::task::yield_now().await;
                                        }
                                        Err(PushError::Closed(_)) => unreachable!(),
                                    }
                                }
                                q.notify_pushed();
                            }
                            2 => {
                                let mut item = item;
                                while let Err(PushError::Full(back)) = q.push_with_slack(1, item, 2) {
                                    item = back;
                                    tokio::task::yield_now().await;
                                }
                            }
                            _ => q.push(2, item).await.unwrap(),
                        }
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
            // One consumer at a time (a second one would mask a lost wake-up of the first),
            // each kind of wait in turn.
            let c = round % 3;
            let consumer = {
                let q = q.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    let mut batch = Vec::new();
                    loop {
                        match c {
                            0 => match q.pop().await {
                                Some(v) => got.push(v),
                                None => break,
                            },
                            1 => {
                                if !q.pop_batch(3, &mut batch).await {
                                    break;
                                }
                                got.append(&mut batch);
                            }
                            _ => {
                                if !q.wait_ready().await {
                                    break;
                                }
                                got.extend(q.try_pop());
                            }
                        }
                    }
                    got
                })
            };
            let deadline = Duration::from_secs(20);
            for p in producers {
                tokio::time::timeout(deadline, p).await.expect("a producer stalled").unwrap();
            }
            // Everything is pushed; consumers must drain it without another push to wake them.
            let drained = tokio::time::timeout(deadline, async {
                while !q.is_empty() {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
            .await;
            assert!(drained.is_ok(), "round {round}: {} items left with every consumer asleep", q.len());
            q.close();
            let mut all =
                tokio::time::timeout(deadline, consumer).await.expect("the consumer stalled").unwrap();
            all.sort_unstable();
            assert_eq!(all, (0..PRODUCERS * PER_PRODUCER).collect::<Vec<_>>(), "round {round}");
        }
    }
}

//! Direct reads: a task waiting for a response reads the link it waits on itself.
//!
//! Without them every received message costs a hand-off: the link's reader task is woken by
//! the medium, reads and decodes the message, and wakes the task that waits for it, which then
//! runs (two task polls and a wake-up per message; on a round trip, one on each side). A link
//! whose [`LinkRx::DIRECT_READS`] says a fresh `recv` future may be polled per wake-up shares
//! its receiving half here, between its reader task and any request waiting on it: the
//! requester reads the link with its own waker, so the medium wakes the requester, which finds
//! its response itself (the reader task stays asleep).
//!
//! Rules that keep every message read, in order, by exactly one party:
//! - Reads happen under [`SharedRx::st`]'s lock, one party at a time (a requester only tries
//!   the lock: a reader busy reading delivers the response by the usual path).
//! - The medium wakes whoever polled it last. A requester that polled it last (`driver`) hands
//!   it back before it stops waiting (response, timeout or drop): it reads on with the reader
//!   task's waker until the medium has nothing, which leaves the reader task registered.
//! - A requester delivers what it reads by the reader's fast path (`try_deliver_now`: inbox,
//!   other requests). Anything else (a control message, a routed message, a full inbox, the
//!   link's end or failure) is left in `held` for the reader task, which is woken; nobody reads
//!   past it until the reader task has handled it (`busy`).

use super::*;

/// A link's receiving half, polled per wake-up with a fresh `recv` future.
pub(super) trait PollRx: Send {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, TransportError>>;
    fn try_buffered(&mut self) -> Result<Option<Message>, TransportError>;
}

impl<R: LinkRx> PollRx for R {
    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, TransportError>> {
        // Dropped when pending: `DIRECT_READS` promises the wake-up it registered stays.
        std::pin::pin!(self.recv()).poll(cx)
    }

    fn try_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        self.try_recv_buffered()
    }
}

/// See the module's documentation.
pub(super) struct SharedRx {
    pub(super) st: Mutex<RxState>,
    /// Responses a request read for itself.
    #[cfg(test)]
    hits: AtomicU64,
}

pub(super) struct RxState {
    /// `None` once the reader task is gone (the link lost or taken over).
    rx: Option<Box<dyn PollRx>>,
    /// The reader task's waker, for handing the medium back to it.
    reader: Option<std::task::Waker>,
    /// The request whose task polled the medium last, or `None`: the reader task did.
    driver: Option<MessageId>,
    /// What only the reader task handles; nothing is read after it until it has.
    held: Option<Result<Option<Message>, TransportError>>,
    /// The reader task is handling what was held.
    busy: bool,
}

impl SharedRx {
    pub(super) fn new<R: LinkRx>(rx: R) -> Arc<Self> {
        Arc::new(SharedRx {
            st: Mutex::new(RxState {
                rx: Some(Box::new(rx)),
                reader: None,
                driver: None,
                held: None,
                busy: false,
            }),
            #[cfg(test)]
            hits: AtomicU64::new(0),
        })
    }
}

/// How a run of reads ended.
// The message goes to its requester once, by value: boxing it would cost an allocation per
// response.
#[allow(clippy::large_enum_variant)]
enum Run {
    /// The medium has nothing more: the context's task is registered for its next readiness.
    Pending,
    /// `held` has something for the reader task.
    Held,
    /// The response the reading request waits for.
    Mine(Message),
}

impl Inner {
    /// Reads what `st`'s link has ready and delivers it by the fast path, until the medium
    /// has nothing more, something must be left to the reader task, or (with `mine`) the
    /// response to that request comes.
    fn read_run(&self, peer: &Peer, st: &mut RxState, cx: &mut Context<'_>, mine: Option<MessageId>) -> Run {
        let RxState { rx: Some(rx), held, .. } = st else { return Run::Pending };
        let mut wake = ReadRun { inner: self, peer, pending: 0, read: 0, bytes: 0 };
        loop {
            let mut next = rx.try_buffered();
            if matches!(next, Ok(None)) {
                next = match rx.poll_recv(cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => return Run::Pending,
                };
            }
            match next {
                Ok(Some(msg)) => {
                    wake.received(msg.payload.len());
                    if !peer.heard.load(Ordering::Relaxed) {
                        peer.heard.store(true, Ordering::Relaxed);
                    }
                    if !peer.turn.load(Ordering::Relaxed) {
                        peer.turn.store(true, Ordering::Relaxed);
                    }
                    if mine.is_some() && self.answers(peer, &msg, mine) {
                        return Run::Mine(msg);
                    }
                    match self.try_deliver_now(peer, msg) {
                        Ok(true) => wake.delivered(),
                        Ok(false) => {}
                        Err(msg) => {
                            *held = Some(Ok(Some(msg)));
                            return Run::Held;
                        }
                    }
                }
                other => {
                    *held = Some(other);
                    return Run::Held;
                }
            }
        }
    }

    /// `msg` is the response to request `mine` and would take `try_deliver_now`'s fast path.
    fn answers(&self, from: &Peer, msg: &Message, mine: Option<MessageId>) -> bool {
        matches!(msg.kind, MessageType::Response { .. })
            && msg.correlation_id == mine
            && msg.payload.len() <= self.config.max_message_size
            && (from.relays || msg.source == from.id)
            && msg.destination.as_ref().is_none_or(|d| *d == self.id)
    }
}

/// The reading loop of a link with direct reads: the reader task's side of [`SharedRx`].
pub(super) async fn shared_read_loop(inner: &Arc<Inner>, peer: &Arc<Peer>, share: &SharedRx, gen: u64) {
    /// The medium's read half goes with the reader task (aborted when the link is lost).
    struct Gone<'a>(&'a SharedRx);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            let rx = lock(&self.0.st).rx.take();
            drop(rx);
        }
    }
    let _gone = Gone(share);
    loop {
        let next = std::future::poll_fn(|cx| {
            let mut guard = lock(&share.st);
            let st = &mut *guard;
            if let Some(h) = st.held.take() {
                st.busy = true;
                return Poll::Ready(h);
            }
            if !st.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.reader = Some(cx.waker().clone());
            }
            st.driver = None;
            match inner.read_run(peer, st, cx, None) {
                Run::Pending => Poll::Pending,
                Run::Held | Run::Mine(_) => {
                    st.busy = true;
                    Poll::Ready(st.held.take().unwrap_or(Ok(None)))
                }
            }
        })
        .await;
        match next {
            Ok(Some(msg)) => {
                if let Err(reason) = Box::pin(inner.dispatch(peer, msg)).await {
                    if !reason.starts_with("goodbye") {
                        Counters::add(&inner.counters.errors, 1);
                        warn!(%reason, "closing link");
                    }
                    inner.link_lost(peer, gen, &reason);
                    return;
                }
                lock(&share.st).busy = false;
            }
            Ok(None) => {
                inner.link_lost(peer, gen, "link closed by peer");
                return;
            }
            Err(e) => {
                Counters::add(&inner.counters.errors, 1);
                warn!(error = %e, "link failed");
                inner.link_lost(peer, gen, &format!("link error: {e}"));
                return;
            }
        }
    }
}

/// A request's side of [`SharedRx`]: reads the link for the response while it waits, and
/// hands the medium back to the reader task when it stops (also when dropped).
pub(super) struct Drive<'a> {
    inner: &'a Inner,
    peer: &'a Peer,
    share: Option<Arc<SharedRx>>,
    id: MessageId,
    /// This request has polled the medium (it may have to hand it back).
    polled: bool,
}

impl<'a> Drive<'a> {
    pub(super) fn new(inner: &'a Inner, peer: &'a Peer, id: MessageId) -> Self {
        let share = lock(&peer.rx_share).clone();
        Drive { inner, peer, share, id, polled: false }
    }

    /// Reads the link with `cx`'s waker if nobody else is reading it now: `Some` is this
    /// request's response (the medium already handed back).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Option<Message> {
        let share = self.share.as_ref()?;
        let Ok(mut guard) = share.st.try_lock() else { return None };
        let st = &mut *guard;
        if st.busy || st.held.is_some() || st.rx.is_none() {
            return None;
        }
        st.driver = Some(self.id);
        self.polled = true;
        match self.inner.read_run(self.peer, st, cx, Some(self.id)) {
            Run::Pending => None,
            Run::Held => {
                // The medium's last poll found something: whoever was registered still is,
                // and the reader task, woken for what is held, registers itself after it.
                st.driver = None;
                if let Some(w) = &st.reader {
                    w.wake_by_ref();
                }
                None
            }
            Run::Mine(msg) => {
                hand_back(self.inner, self.peer, self.id, st);
                self.polled = false;
                #[cfg(test)]
                share.hits.fetch_add(1, Ordering::Relaxed);
                Some(msg)
            }
        }
    }
}

/// If request `id` polled the medium last, reads on with the reader task's waker until the
/// medium has nothing (the reader task is then registered for its next readiness).
fn hand_back(inner: &Inner, peer: &Peer, id: MessageId, st: &mut RxState) {
    if st.driver != Some(id) {
        return;
    }
    st.driver = None;
    let Some(w) = st.reader.clone() else { return };
    if let Run::Held = inner.read_run(peer, st, &mut Context::from_waker(&w), None) {
        w.wake_by_ref();
    }
}

impl Drop for Drive<'_> {
    fn drop(&mut self) {
        if !self.polled {
            return;
        }
        if let Some(share) = &self.share {
            hand_back(self.inner, self.peer, self.id, &mut lock(&share.st));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::framed_link;
    use std::sync::atomic::AtomicUsize;

    /// A hub answering `echo` (after `delay`; and sending its caller a directed message per
    /// request when `notify`), and a node "c" dialed into it over a duplex link through the
    /// real framing.
    async fn echo_pair(delay: Option<Duration>, notify: bool) -> (Node, Node) {
        let cfg = TransportConfig::default();
        let hub = Node::new("hub", cfg.clone(), "duplex");
        hub.set_hub(true);
        let (a, b) = tokio::io::duplex(1 << 16);
        hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
        let c = Node::new("c", cfg.clone(), "duplex");
        c.connect_link(framed_link(b, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()))
            .await
            .expect("handshake");
        let responder = hub.clone();
        tokio::spawn(async move {
            while let Ok((from, req)) = responder.receive().await {
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                if notify {
                    let note = Message::new("hub", MessageType::Event { topic: "note".into() })
                        .with_payload_bytes(req.payload.clone());
                    if responder.send(&from, note).await.is_err() {
                        break;
                    }
                }
                if responder.respond_bytes(&req, req.payload.clone()).await.is_err() {
                    break;
                }
            }
        });
        (hub, c)
    }

    fn share_of(node: &Node, peer: &str) -> Arc<SharedRx> {
        let peer = lock(&node.inner.peers).get(peer).cloned().expect("peer");
        let share = lock(&peer.rx_share).clone();
        share.expect("a framed link reads directly")
    }

    fn echo(i: usize) -> Message {
        Message::new("c", MessageType::Request { method: "echo".into() })
            .with_payload_bytes(Bytes::from(i.to_le_bytes().to_vec()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_requester_reads_its_own_responses_on_a_framed_link() {
        // The response comes well after the requester has started waiting (not while it is
        // still on its way from its write to its wait, when the reader task may take it).
        let (hub, c) = echo_pair(Some(Duration::from_millis(1)), false).await;
        let share = share_of(&c, "hub");
        let before = share.hits.load(Ordering::Relaxed);
        for i in 0..100 {
            let r = c.request_message("hub", echo(i), Duration::from_secs(10)).await.expect("response");
            assert_eq!(&r.payload[..], &i.to_le_bytes()[..], "response {i}");
        }
        // A response the link's reader task happened to read first is delivered the usual way;
        // nearly all are read by their requester.
        let hits = share.hits.load(Ordering::Relaxed) - before;
        assert!(hits >= 80, "only {hits} of 100 responses were read by their requester");
        c.close().await;
        hub.close().await;
    }

    /// Several requesters on one link, some giving up midway, with a directed message for
    /// the client before every response: every response reaches its own requester intact,
    /// and every directed message reaches the inbox (nothing is left unread or read twice
    /// when the medium passes between requesters and the reader task).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requesters_sharing_a_link_with_abandoned_requests_lose_nothing() {
        let (hub, c) = echo_pair(None, true).await;
        const TASKS: usize = 6;
        const EACH: usize = 150;
        let abandoned = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (c, abandoned) = (c.clone(), abandoned.clone());
            tasks.push(tokio::spawn(async move {
                for k in 0..EACH {
                    let i = t * EACH + k;
                    let req = c.request_message("hub", echo(i), Duration::from_secs(10));
                    let r = if k % 7 == 3 {
                        // Dropped while it may be the one reading the link.
                        match tokio::time::timeout(Duration::from_micros(20), req).await {
                            Ok(r) => r,
                            Err(_) => {
                                abandoned.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                        }
                    } else {
                        req.await
                    };
                    let r = r.expect("response");
                    assert_eq!(&r.payload[..], &i.to_le_bytes()[..], "task {t}: response {k}");
                }
            }));
        }
        let mut seen = vec![false; TASKS * EACH];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for n in 0..TASKS * EACH {
            let (_, m) = tokio::time::timeout_at(deadline, c.receive())
                .await
                .unwrap_or_else(|_| panic!("only {n} directed messages arrived"))
                .expect("receive");
            let i = usize::from_le_bytes(m.payload[..].try_into().expect("an index"));
            assert!(!std::mem::replace(&mut seen[i], true), "directed message {i} arrived twice");
        }
        for t in tasks {
            tokio::time::timeout_at(deadline, t).await.expect("requesters finish").expect("requester");
        }
        assert!(c.try_receive().is_none(), "more directed messages than requests");
        println!("{} of {} requests abandoned", abandoned.load(Ordering::Relaxed), TASKS * EACH / 7);
        c.close().await;
        hub.close().await;
    }

    /// A request that stops waiting without its response (its own timeout, or its future
    /// dropped) while it is the one the link wakes hands the link back to the reader task:
    /// what comes afterwards is still read and delivered.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_that_stops_waiting_hands_the_link_back() {
        let cfg = TransportConfig::default();
        let hub = Node::new("hub", cfg.clone(), "duplex");
        hub.set_hub(true);
        let (a, b) = tokio::io::duplex(1 << 16);
        hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
        let c = Node::new("c", cfg.clone(), "duplex");
        c.connect_link(framed_link(b, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()))
            .await
            .expect("handshake");
        // Never answers; tells the client 50 ms after each request.
        let mute = hub.clone();
        tokio::spawn(async move {
            while let Ok((from, req)) = mute.receive().await {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let note = Message::new("hub", MessageType::Event { topic: "note".into() })
                    .with_payload_bytes(req.payload.clone());
                if mute.send(&from, note).await.is_err() {
                    break;
                }
            }
        });
        let share = share_of(&c, "hub");
        for i in 0..2 {
            if i == 0 {
                let req = c.request_message("hub", echo(i), Duration::from_millis(10));
                assert!(matches!(req.await, Err(TransportError::Timeout)), "no response, so a timeout");
            } else {
                let req = c.request_message("hub", echo(i), Duration::from_secs(10));
                assert!(tokio::time::timeout(Duration::from_millis(10), req).await.is_err(), "dropped");
            }
            assert_eq!(lock(&share.st).driver, None, "request {i} left the link registered to itself");
            let (_, note) = tokio::time::timeout(Duration::from_secs(5), c.receive())
                .await
                .unwrap_or_else(|_| panic!("the message after request {i} was never read"))
                .expect("receive");
            assert_eq!(&note.payload[..], &i.to_le_bytes()[..]);
        }
        c.close().await;
        hub.close().await;
    }
}

//! Direct reads: a task waiting for a response, or for its inbox, reads the link it waits on
//! itself.
//!
//! Without them every received message costs a hand-off: the link's reader task is woken by
//! the medium, reads and decodes the message, and wakes the task that waits for it, which then
//! runs (two task polls and a wake-up per message; on a round trip, one on each side). A link
//! whose [`LinkRx::DIRECT_READS`] says a fresh `recv` future may be polled per wake-up shares
//! its receiving half here, between its reader task and the tasks waiting on it: a request
//! waiting for its response, and the consumer of a node with this one peer waiting for its
//! inbox. The medium wakes the waiting task, which reads the link and finds what it waits for
//! itself; the reader task stays asleep.
//!
//! How every message is read, in order, by exactly one party, and never left unread:
//! - Reads happen under [`SharedRx::st`]'s lock, one party at a time, and every read delivers
//!   what it reads by the reader's fast path (`try_deliver_now`: the inbox, the requests).
//!   Anything else (a control message, a routed message, a full inbox, the link's end or
//!   failure) is left in `held` for the reader task, which is woken; nobody reads past it
//!   until the reader task has handled it (`busy`).
//! - The medium is always polled with one waker, [`Forward`]'s, which passes each wake-up on
//!   to the task waiting on the link if there is one, else to the reader task. So the medium's
//!   registration never belongs to a task that stopped waiting.
//! - A poll that found nothing left the medium *armed*: registered, with nothing buffered.
//!   Every wake-up counts in [`Forward::wakes`], and the arming remembers the count it saw
//!   before that poll: a wake-up since then disarms it. A waiting task reads only a disarmed
//!   link (an armed one will wake it); a task that stops waiting (with what it waited for, on
//!   a timeout, or dropped) re-arms a disarmed link before it goes, reading what is there: a
//!   wake-up it took is never lost with it.

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

/// The waker the medium is polled with: passes each wake-up on (see the module's docs).
pub(super) struct Forward {
    targets: Mutex<Targets>,
    /// Wake-ups so far.
    wakes: AtomicU64,
}

struct Targets {
    /// The reader task's waker.
    reader: Option<std::task::Waker>,
    /// The task waiting on the link, with its [`Drive`]'s token.
    waiting: Option<(u64, std::task::Waker)>,
}

impl std::task::Wake for Forward {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::SeqCst);
        // Its own lock, not the state's: a medium may wake its waker from inside a poll made
        // under the state's lock (tokio's cooperative budget does).
        let w = {
            let t = lock(&self.targets);
            t.waiting.as_ref().map(|(_, w)| w.clone()).or_else(|| t.reader.clone())
        };
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// See the module's documentation.
pub(super) struct SharedRx {
    pub(super) st: Mutex<RxState>,
    fwd: Arc<Forward>,
    /// `fwd` as a waker.
    waker: std::task::Waker,
    /// Responses a request read for itself.
    #[cfg(test)]
    hits: AtomicU64,
}

pub(super) struct RxState {
    /// `None` once the reader task is gone (the link lost or taken over).
    rx: Option<Box<dyn PollRx>>,
    /// The count of wake-ups seen before the poll that last found nothing, if no read has
    /// found something since: the link is armed while no wake-up has come after it.
    armed_at: Option<u64>,
    /// What only the reader task handles; nothing is read after it until it has.
    held: Option<Result<Option<Message>, TransportError>>,
    /// The reader task is handling what was held.
    busy: bool,
}

impl SharedRx {
    pub(super) fn new<R: LinkRx>(rx: R) -> Arc<Self> {
        let fwd = Arc::new(Forward {
            targets: Mutex::new(Targets { reader: None, waiting: None }),
            wakes: AtomicU64::new(0),
        });
        Arc::new(SharedRx {
            st: Mutex::new(RxState { rx: Some(Box::new(rx)), armed_at: None, held: None, busy: false }),
            waker: std::task::Waker::from(fwd.clone()),
            fwd,
            #[cfg(test)]
            hits: AtomicU64::new(0),
        })
    }

    fn armed(&self, st: &RxState) -> bool {
        st.armed_at == Some(self.fwd.wakes.load(Ordering::SeqCst))
    }

    fn wake_reader(&self) {
        let w = lock(&self.fwd.targets).reader.clone();
        if let Some(w) = w {
            w.wake();
        }
    }
}

/// What a run of reads is for.
#[derive(Clone, Copy, PartialEq)]
enum Want {
    /// Everything the link has (the reader task, a task re-arming the link).
    Nothing,
    /// The response to this request.
    Response(MessageId),
    /// A message in the inbox.
    Inbox,
}

/// How a run of reads ended.
// The message goes to its requester once, by value: boxing it would cost an allocation per
// response.
#[allow(clippy::large_enum_variant)]
enum Run {
    /// The medium has nothing more: it is armed.
    Pending,
    /// `held` has something for the reader task.
    Held,
    /// The awaited response.
    Mine(Message),
    /// A message went to the inbox (with [`Want::Inbox`]).
    Delivered,
}

impl Inner {
    /// Reads what `share`'s link has ready and delivers it by the fast path, until the
    /// medium has nothing more, something must be left to the reader task, or what `want`s
    /// comes.
    fn read_run(&self, peer: &Peer, share: &SharedRx, st: &mut RxState, want: Want) -> Run {
        let RxState { rx: Some(rx), held, armed_at, .. } = st else { return Run::Pending };
        let mut cx = Context::from_waker(&share.waker);
        let mut wake = ReadRun { inner: self, peer, pending: 0, read: 0, bytes: 0 };
        loop {
            let mut next = rx.try_buffered();
            if matches!(next, Ok(None)) {
                let seen = share.fwd.wakes.load(Ordering::SeqCst);
                next = match rx.poll_recv(&mut cx) {
                    Poll::Ready(r) => r,
                    Poll::Pending => {
                        *armed_at = Some(seen);
                        return Run::Pending;
                    }
                };
            }
            *armed_at = None;
            match next {
                Ok(Some(msg)) => {
                    wake.received(msg.payload.len());
                    if !peer.heard.load(Ordering::Relaxed) {
                        peer.heard.store(true, Ordering::Relaxed);
                    }
                    if !peer.turn.load(Ordering::Relaxed) {
                        peer.turn.store(true, Ordering::Relaxed);
                    }
                    if let Want::Response(id) = want {
                        if self.answers(peer, &msg, id) {
                            return Run::Mine(msg);
                        }
                    }
                    match self.try_deliver_now(peer, msg) {
                        Ok(true) => {
                            wake.delivered();
                            if want == Want::Inbox {
                                return Run::Delivered;
                            }
                        }
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

    /// `msg` is the response to request `id` and would take `try_deliver_now`'s fast path.
    fn answers(&self, from: &Peer, msg: &Message, id: MessageId) -> bool {
        matches!(msg.kind, MessageType::Response { .. })
            && msg.correlation_id == Some(id)
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
            {
                let mut t = lock(&share.fwd.targets);
                if !t.reader.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    t.reader = Some(cx.waker().clone());
                }
            }
            match inner.read_run(peer, share, st, Want::Nothing) {
                Run::Pending => Poll::Pending,
                Run::Held | Run::Mine(_) | Run::Delivered => {
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

/// Tells the waits on links apart.
static DRIVES: AtomicU64 = AtomicU64::new(1);

/// A waiting task's side of [`SharedRx`]: a request reading the link for its response, or a
/// consumer reading it for its inbox. When it stops waiting (also when dropped) it leaves the
/// link armed.
pub(super) struct Drive<'a> {
    inner: &'a Inner,
    peer: &'a Peer,
    share: Option<Arc<SharedRx>>,
    want: Want,
    token: u64,
    /// This wait is the link's waiting task (it must leave the link armed when it stops).
    waiting: bool,
}

impl<'a> Drive<'a> {
    /// A wait for the response to request `want`, or (`None`) for the inbox.
    pub(super) fn new(inner: &'a Inner, peer: &'a Peer, want: Option<MessageId>) -> Self {
        let share = lock(&peer.rx_share).clone();
        let token = if share.is_some() { DRIVES.fetch_add(1, Ordering::Relaxed) } else { 0 };
        let want = want.map_or(Want::Inbox, Want::Response);
        Drive { inner, peer, share, want, token, waiting: false }
    }

    /// Makes `cx`'s task the one the link wakes and reads the link if a wake-up came since it
    /// was armed: `Some` is the awaited response (a message for the inbox is in the inbox).
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Option<Message> {
        let share = self.share.as_ref()?;
        let mut guard = lock(&share.st);
        let st = &mut *guard;
        if st.busy || st.held.is_some() || st.rx.is_none() {
            // The reader task reads on when it is done (or the link is gone).
            return None;
        }
        {
            let mut t = lock(&share.fwd.targets);
            match &t.waiting {
                Some((token, w)) if *token == self.token && w.will_wake(cx.waker()) => {}
                _ => t.waiting = Some((self.token, cx.waker().clone())),
            }
        }
        self.waiting = true;
        // Registered before the look: a wake-up after it comes to this task.
        if share.armed(st) {
            return None;
        }
        match self.inner.read_run(self.peer, share, st, self.want) {
            Run::Pending => None,
            Run::Held => {
                share.wake_reader();
                None
            }
            Run::Mine(msg) => {
                self.waiting = false;
                stop_waiting(self.inner, self.peer, share, self.token, st);
                #[cfg(test)]
                share.hits.fetch_add(1, Ordering::Relaxed);
                Some(msg)
            }
            Run::Delivered => {
                self.waiting = false;
                stop_waiting(self.inner, self.peer, share, self.token, st);
                None
            }
        }
    }
}

/// The wait `token` stops being the link's waiting task; a disarmed link is read (delivering
/// what it has) until it is armed again, or what it has is left to the reader task.
fn stop_waiting(inner: &Inner, peer: &Peer, share: &SharedRx, token: u64, st: &mut RxState) {
    {
        let mut t = lock(&share.fwd.targets);
        if t.waiting.as_ref().is_some_and(|(w, _)| *w == token) {
            t.waiting = None;
        }
    }
    if st.busy || st.held.is_some() || share.armed(st) {
        return;
    }
    if let Run::Held = inner.read_run(peer, share, st, Want::Nothing) {
        share.wake_reader();
    }
}

impl Drop for Drive<'_> {
    fn drop(&mut self) {
        if !self.waiting {
            return;
        }
        if let Some(share) = &self.share {
            stop_waiting(self.inner, self.peer, share, self.token, &mut lock(&share.st));
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
            assert!(
                lock(&share.fwd.targets).waiting.is_none(),
                "request {i} left itself the link's waiting task"
            );
            assert!(share.armed(&lock(&share.st)), "request {i} left the link unarmed");
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

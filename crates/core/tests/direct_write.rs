//! `LinkTx::direct_write_idle`: a link that says its writes never wait takes every message
//! whose queue is empty from the sender's own task; a stream link (the default) leaves a burst
//! to the writer task, which batches it; and when the peer has answered since our last write
//! (its turn is over), the sender writes directly without waiting out the idle time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hivewire_core::{
    framed_halves, framed_link, FramedTx, Link, LinkSettings, LinkTx, Message, MessageType, Node, PeerInfo,
    TransportConfig, TransportError,
};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

/// A framed sending half that records which task wrote each batch; once `stuck` is set, its
/// writes never finish (a peer that stays connected but has stopped reading).
struct Recording {
    inner: FramedTx<WriteHalf<DuplexStream>>,
    idle: Duration,
    writers: Arc<Mutex<Vec<Option<tokio::task::Id>>>>,
    stuck: Arc<AtomicBool>,
}

impl LinkTx for Recording {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        if self.stuck.load(Ordering::Acquire) {
            std::future::pending::<()>().await;
        }
        let counted = batch
            .iter()
            .filter(|m| matches!(m.kind, MessageType::Event { .. } | MessageType::Request { .. }))
            .count();
        for _ in 0..counted {
            self.writers.lock().unwrap().push(tokio::task::try_id());
        }
        self.inner.send_batch(batch).await
    }
    async fn close(&mut self) {
        self.inner.close().await
    }
    fn configure(&mut self, settings: &LinkSettings) {
        self.inner.configure(settings)
    }
    fn direct_write_idle(&self) -> Duration {
        self.idle
    }
}

type Writers = Arc<Mutex<Vec<Option<tokio::task::Id>>>>;

/// A hub, and a client whose link to it records which task wrote each event and request.
async fn pair(idle: Duration) -> (Node, Node, Writers) {
    let (hub, client, writers, _) = pair_with_stuck(idle).await;
    (hub, client, writers)
}

/// As [`pair`], with the switch that makes the client's writes stop finishing.
async fn pair_with_stuck(idle: Duration) -> (Node, Node, Writers, Arc<AtomicBool>) {
    let cfg = TransportConfig::default();
    let (a, b) = tokio::io::duplex(1 << 20);
    let hub = Node::new("hub", cfg.clone(), "duplex");
    hub.set_hub(true);
    hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
    let (r, w): (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) = tokio::io::split(b);
    let plain = framed_halves(r, w, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default());
    let writers = Arc::new(Mutex::new(Vec::new()));
    let stuck = Arc::new(AtomicBool::new(false));
    let link = Link::new(
        Recording { inner: plain.tx, idle, writers: writers.clone(), stuck: stuck.clone() },
        plain.rx,
        PeerInfo::default(),
    );
    let client = Node::new("client", cfg, "duplex");
    client.connect_link(link).await.expect("handshake");
    // Let the handshake's own writes age past the default idle time.
    tokio::time::sleep(Duration::from_millis(5)).await;
    (hub, client, writers, stuck)
}

/// Sends 20 events from one task, `gap` apart (none: a burst); returns how many were written
/// by that task.
async fn written_by_sender(idle: Duration, gap: Option<Duration>) -> usize {
    let (hub, client, writers) = pair(idle).await;
    if gap.is_some() {
        // The hub speaks first, once: the client's first message then has the turn.
        let hello = Message::new("hub", MessageType::Event { topic: "t".into() });
        hub.send("client", hello).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), client.receive()).await.expect("delivered").unwrap();
    }
    let sender = tokio::spawn({
        let client = client.clone();
        async move {
            for i in 0..20u32 {
                let m = Message::new("client", MessageType::Event { topic: "t".into() })
                    .with_payload_bytes(bytes::Bytes::from(i.to_be_bytes().to_vec()));
                client.send("hub", m).await.unwrap();
                if let Some(gap) = gap {
                    tokio::time::sleep(gap).await;
                }
            }
            tokio::task::id()
        }
    });
    let sender_id = sender.await.unwrap();
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(5), hub.receive()).await.expect("delivered").unwrap();
    }
    let by_sender = writers.lock().unwrap().iter().filter(|t| **t == Some(sender_id)).count();
    client.close().await;
    hub.close().await;
    by_sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_never_waits_takes_every_message_from_its_sender() {
    assert_eq!(written_by_sender(Duration::ZERO, None).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_link_leaves_a_burst_to_the_writer() {
    let n = written_by_sender(hivewire_core::link::DEFAULT_DIRECT_WRITE_IDLE, None).await;
    assert!(n < 20, "{n} of 20 burst messages were written by the sender itself");
}

/// Longer than any test: only the peer's turn can let a sender write directly.
const NEVER_IDLE: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_after_the_answer_is_written_by_the_requester() {
    let (hub, client, writers) = pair(NEVER_IDLE).await;
    let responder = tokio::spawn({
        let hub = hub.clone();
        async move {
            for _ in 0..10 {
                let (_, req) = hub.receive().await.unwrap();
                hub.respond_bytes(&req, req.payload.clone()).await.unwrap();
            }
        }
    });
    let requester = tokio::spawn({
        let client = client.clone();
        async move {
            for i in 0..10u8 {
                let r = client.request("hub", "echo", &i, Duration::from_secs(5)).await.unwrap();
                assert!(!r.payload.is_empty());
            }
            tokio::task::id()
        }
    });
    let requester_id = requester.await.unwrap();
    responder.await.unwrap();
    let recorded = writers.lock().unwrap().clone();
    let by_requester = recorded.iter().filter(|t| **t == Some(requester_id)).count();
    client.close().await;
    hub.close().await;
    // Each request after the first follows the hub's answer (the first follows only the
    // handshake, which the reader did not see).
    assert_eq!(recorded.len(), 10);
    assert!(by_requester >= 9, "only {by_requester} of 10 requests were written by the requester itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_to_a_silent_peer_still_go_to_the_writer() {
    // The hub's one message gives the first event the turn; nothing answers after that, so
    // the others go to the writer however far apart they are.
    let n = written_by_sender(NEVER_IDLE, Some(Duration::from_millis(1))).await;
    assert!(n <= 1, "{n} of 20 messages to a silent peer were written by the sender itself");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_write_the_medium_never_takes_ends_when_its_link_is_lost() {
    let (hub, client, _, stuck) = pair_with_stuck(Duration::ZERO).await;
    let event = |n: u32| {
        Message::new("client", MessageType::Event { topic: "t".into() })
            .with_payload_bytes(bytes::Bytes::from(n.to_be_bytes().to_vec()))
    };
    client.send("hub", event(0)).await.expect("the link is up");
    tokio::time::timeout(Duration::from_secs(5), hub.receive()).await.expect("delivered").unwrap();

    // The peer stays connected but stops reading: this send's direct write waits for good.
    stuck.store(true, Ordering::Release);
    let blocked = tokio::spawn({
        let client = client.clone();
        async move { client.send("hub", event(1)).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!blocked.is_finished(), "a write the medium never took has ended");

    // The link is lost (the hub goes away): the waiting sender gets an error instead of
    // holding the link for good, and the client can still close.
    hub.close().await;
    let sent = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("the sender still waits on a lost link")
        .unwrap();
    assert!(matches!(sent, Err(TransportError::ConnectionError(_))), "{sent:?}");
    tokio::time::timeout(Duration::from_secs(5), client.close()).await.expect("the client closes");
}

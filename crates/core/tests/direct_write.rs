//! `LinkTx::direct_write_idle`: a link that says its writes never wait takes every message
//! whose queue is empty from the sender's own task; a stream link (the default) leaves a burst
//! to the writer task, which batches it; and when the peer has answered since our last write
//! (its turn is over), the sender writes directly without waiting out the idle time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hivewire_core::{
    framed_halves, framed_link, FramedTx, Link, LinkSettings, LinkTx, Message, MessageType, Node, PeerInfo,
    TransportConfig, TransportError,
};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

/// A framed sending half that records which task wrote each batch.
struct Recording {
    inner: FramedTx<WriteHalf<DuplexStream>>,
    idle: Duration,
    writers: Arc<Mutex<Vec<Option<tokio::task::Id>>>>,
}

impl LinkTx for Recording {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
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

/// A hub, and a client whose link to it records which task wrote each event and request.
async fn pair(idle: Duration) -> (Node, Node, Arc<Mutex<Vec<Option<tokio::task::Id>>>>) {
    let cfg = TransportConfig::default();
    let (a, b) = tokio::io::duplex(1 << 20);
    let hub = Node::new("hub", cfg.clone(), "duplex");
    hub.set_hub(true);
    hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
    let (r, w): (ReadHalf<DuplexStream>, WriteHalf<DuplexStream>) = tokio::io::split(b);
    let plain = framed_halves(r, w, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default());
    let writers = Arc::new(Mutex::new(Vec::new()));
    let link = Link::new(
        Recording { inner: plain.tx, idle, writers: writers.clone() },
        plain.rx,
        PeerInfo::default(),
    );
    let client = Node::new("client", cfg, "duplex");
    client.connect_link(link).await.expect("handshake");
    // Let the handshake's own writes age past the default idle time.
    tokio::time::sleep(Duration::from_millis(5)).await;
    (hub, client, writers)
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

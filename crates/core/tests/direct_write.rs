//! `LinkTx::direct_write_idle`: a link that says its writes never wait takes every message
//! whose queue is empty from the sender's own task; a stream link (the default) leaves a burst
//! to the writer task, which batches it.

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
        let events = batch.iter().filter(|m| matches!(m.kind, MessageType::Event { .. })).count();
        for _ in 0..events {
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

/// Sends 20 events in a burst from one task; returns how many were written by that task.
async fn written_by_sender(idle: Duration) -> usize {
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
    let sender = tokio::spawn({
        let client = client.clone();
        async move {
            for i in 0..20u32 {
                let m = Message::new("client", MessageType::Event { topic: "t".into() })
                    .with_payload_bytes(bytes::Bytes::from(i.to_be_bytes().to_vec()));
                client.send("hub", m).await.unwrap();
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
    assert_eq!(written_by_sender(Duration::ZERO).await, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_link_leaves_a_burst_to_the_writer() {
    let n = written_by_sender(hivewire_core::link::DEFAULT_DIRECT_WRITE_IDLE).await;
    assert!(n < 20, "{n} of 20 burst messages were written by the sender itself");
}

//! `inbound_queue_bytes`: large messages waiting for `receive` are bounded in bytes, not only
//! in count; the reader holds back past the bound, and nothing is lost or reordered.

mod common;

use std::time::Duration;

use hivewire_core::{Message, MessageType, Node, TransportConfig};

const K32: usize = 32 * 1024;

async fn linked(hub_cfg: TransportConfig) -> (Node, Node) {
    common::pair(hub_cfg, TransportConfig::default(), 4 << 20).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_wait_for_receive_within_the_byte_bound() {
    let budget = 2 * K32;
    let (hub, client) =
        linked(TransportConfig { inbound_queue_bytes: budget, ..TransportConfig::default() }).await;
    let before = hub.stats().messages_received;

    // 40 messages of 32 KiB, one larger than the whole bound, and small ones between.
    let sizes: Vec<usize> = (0..45u32)
        .map(|n| {
            if n == 20 {
                5 * budget
            } else if n % 10 == 5 {
                100
            } else {
                K32
            }
        })
        .collect();
    let sender = tokio::spawn({
        let client = client.clone();
        let sizes = sizes.clone();
        async move {
            for (n, len) in sizes.into_iter().enumerate() {
                let m = Message::new("client", MessageType::Event { topic: "t".into() })
                    .with_payload_bytes(common::numbered(n as u32, len));
                client.send("hub", m).await.unwrap();
            }
        }
    });
    // Nobody receives yet: the hub's reader takes what fits in the bound, plus the one it
    // holds while it waits (and small messages read on the way, which are not charged).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = hub.stats().messages_received - before;
    assert!(read <= 4, "the hub's reader took {read} messages past a bound of two");

    common::expect_numbered(&hub, sizes).await;
    sender.await.unwrap();
    client.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_is_bounded_in_bytes_too() {
    let hub_cfg = TransportConfig { inbound_queue_bytes: 2 * K32, ..TransportConfig::default() };
    let (hub, client) = linked(hub_cfg).await;
    let mut sub = hub.subscribe("t").await.unwrap();
    client.barrier(Duration::from_secs(5)).await.unwrap();
    let before = hub.stats().messages_received;
    let sender = tokio::spawn({
        let client = client.clone();
        async move {
            for n in 0..30u32 {
                client.publish_message(common::numbered_event(n, K32)).await.unwrap();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let read = hub.stats().messages_received - before;
    assert!(read <= 4, "the hub's reader took {read} events past a bound of two");
    for n in 0..30u32 {
        let m = tokio::time::timeout(Duration::from_secs(10), sub.recv())
            .await
            .unwrap_or_else(|_| panic!("event {n} never came"))
            .expect("open");
        assert_eq!(m.payload, common::numbered(n, K32), "event {n}");
    }
    sender.await.unwrap();
    client.close().await;
    hub.close().await;
}

/// A reader waiting for room in a subscription nobody reads gives up when the subscription is
/// dropped, so the link carries on (here: a directed message reaches `receive`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_full_subscription_frees_the_link() {
    let hub_cfg = TransportConfig { inbound_queue_bytes: 2 * K32, ..TransportConfig::default() };
    let (hub, client) = linked(hub_cfg).await;
    let sub = hub.subscribe("t").await.unwrap();
    client.barrier(Duration::from_secs(5)).await.unwrap();
    for n in 0..5u32 {
        client.publish_message(common::numbered_event(n, K32)).await.unwrap();
    }
    let direct = Message::new("client", MessageType::Event { topic: "direct".into() })
        .with_payload_bytes(common::numbered(99, 100));
    client.send("hub", direct).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(hub.try_receive().is_none(), "the reader should be held by the full subscription");
    drop(sub);
    let (_, m) = tokio::time::timeout(Duration::from_secs(5), hub.receive())
        .await
        .expect("the link stayed blocked after the subscription was dropped")
        .unwrap();
    assert_eq!(m.payload, common::numbered(99, 100));
    client.close().await;
    hub.close().await;
}

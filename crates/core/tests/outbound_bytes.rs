//! `outbound_queue_bytes`: large messages waiting to go out to one peer are bounded in bytes,
//! not only in count — for a sender (under either backpressure policy) and for a hub relaying
//! to a peer that stops reading. Nothing accepted is lost or reordered.

mod common;

use std::time::Duration;

use hivewire_core::{Backpressure, Node, TransportConfig, TransportError};

const K16: usize = 16 * 1024;

/// The queue's bytes for `peer` as `node` reports them.
fn queued(node: &Node, peer: &str) -> (usize, usize) {
    let stats = node.stats();
    let p = stats.peers.iter().find(|p| p.agent.as_str() == peer).expect("peer listed");
    (p.queued, p.queued_bytes)
}

/// A hub that reads one large message and then nothing (its inbox's byte bound is one
/// message and nobody receives), behind a small duplex: the client's writer soon blocks and
/// its queue holds what the bound lets in.
async fn stalled_pair(client_cfg: TransportConfig) -> (Node, Node) {
    let hub_cfg = TransportConfig { inbound_queue_bytes: K16, ..TransportConfig::default() };
    common::pair(hub_cfg, client_cfg, 64 * 1024).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_policy_refuses_past_the_byte_bound_and_keeps_the_link() {
    let limit = 4 * K16;
    let cfg = TransportConfig {
        outbound_queue_bytes: limit,
        backpressure: Backpressure::Error,
        ..TransportConfig::default()
    };
    let (hub, client) = stalled_pair(cfg).await;

    // Fill until refused; let the writer take what it can (into the duplex, the hub's read
    // buffer, and a batch in hand) until it blocks; fill again. The queue then holds exactly
    // what the bound admits, and nothing moves any more.
    let mut sent: Vec<usize> = Vec::new();
    let mut stable = false;
    for round in 0..10 {
        let mut refused = None;
        for _ in 0..1000 {
            let n = sent.len() as u32;
            match client.send("hub", common::numbered_event(n, K16)).await {
                Ok(()) => sent.push(K16),
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        match refused {
            Some(TransportError::QueueBytesFull { limit: l }) => assert_eq!(l, limit),
            other => panic!("round {round}: expected QueueBytesFull, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (count, bytes) = queued(&client, "hub");
        assert!(bytes <= limit, "{count} messages queued, {bytes} bytes charged past {limit}");
        if bytes == limit {
            assert_eq!(count, 4);
            stable = true;
            break;
        }
    }
    assert!(stable, "the client's writer never blocked");

    // The bound is in bytes: a small message still goes in, a large one still does not.
    let n = sent.len() as u32;
    client.send("hub", common::numbered_event(n, 100)).await.expect("a small message fits");
    sent.push(100);
    let n = sent.len() as u32;
    assert!(matches!(
        client.send("hub", common::numbered_event(n, K16)).await,
        Err(TransportError::QueueBytesFull { .. })
    ));

    // The link survived: everything accepted arrives, intact and in order.
    common::expect_numbered(&hub, sent).await;
    assert_eq!(queued(&client, "hub"), (0, 0));
    client.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_sender_resumes_when_the_queue_drains_and_gives_up_on_close() {
    let limit = 4 * K16;
    let cfg = TransportConfig { outbound_queue_bytes: limit, ..TransportConfig::default() };
    let (hub, client) = stalled_pair(cfg.clone()).await;
    const N: u32 = 40;
    let sender = common::spawn_numbered_sends(&client, "hub", N, K16);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!sender.is_finished(), "every send returned past a bound of four messages");
    let (_, bytes) = queued(&client, "hub");
    assert!(bytes <= limit, "{bytes} bytes queued past a bound of {limit}");
    common::expect_numbered(&hub, (0..N).map(|_| K16)).await;
    sender.await.unwrap();

    // A sender waiting for room when its node closes gets an error, not a hang.
    let (hub2, client2) = stalled_pair(cfg).await;
    let blocked = tokio::spawn({
        let client2 = client2.clone();
        async move {
            for n in 0..N {
                client2.send("hub", common::numbered_event(n, K16)).await?;
            }
            Ok::<(), TransportError>(())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished());
    client2.close().await;
    let r = tokio::time::timeout(Duration::from_secs(5), blocked).await.expect("the sender hung").unwrap();
    assert!(r.is_err(), "sends past the bound succeeded into a closed node");
    client.close().await;
    hub.close().await;
    hub2.close().await;
}

/// A hub relaying to a peer that stops reading holds at most the bound for it, and holds back
/// the sender's link meanwhile; when the peer reads again, everything arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_relaying_to_a_stalled_peer_stays_within_the_byte_bound() {
    let limit = 4 * K16;
    let hub = common::hub(TransportConfig { outbound_queue_bytes: limit, ..TransportConfig::default() });
    let slow_cfg = TransportConfig { inbound_queue_bytes: K16, ..TransportConfig::default() };
    let slow = common::join(&hub, "slow", slow_cfg, 64 * 1024).await;
    let fast = common::join(&hub, "fast", TransportConfig::default(), 64 * 1024).await;
    const N: u32 = 60;
    let sender = common::spawn_numbered_sends(&fast, "slow", N, K16);
    let mut most = 0;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(30)).await;
        most = most.max(queued(&hub, "slow").1);
    }
    assert!(most <= limit, "the hub queued {most} bytes for the stalled peer, bound {limit}");
    // The hub held back the link from `fast` meanwhile: it stopped reading well short of N
    // (the rest waits in `fast`'s queue, the duplex and the read buffers).
    let relayed = hub.stats().peers.iter().find(|p| p.agent.as_str() == "fast").unwrap().messages_received;
    assert!(relayed < u64::from(N) / 2, "the hub read {relayed} of {N} messages for a stalled peer");
    for n in 0..N {
        let (from, m) = tokio::time::timeout(Duration::from_secs(10), slow.receive())
            .await
            .unwrap_or_else(|_| panic!("message {n} never came"))
            .unwrap();
        assert_eq!(from.as_str(), "fast");
        assert_eq!(m.payload, common::numbered(n, K16), "message {n}");
    }
    sender.await.unwrap();
    for node in [fast, slow, hub] {
        node.close().await;
    }
}

/// A stalled pair whose client queues at most two messages (and up to 1 MiB of them).
async fn stalled_queue_of_two() -> (Node, Node) {
    let cfg = TransportConfig {
        outbound_queue_capacity: 2,
        outbound_queue_bytes: 1 << 20,
        ..TransportConfig::default()
    };
    stalled_pair(cfg).await
}

/// Sends under a timeout to a peer that stopped reading, `gap` apart, until five were
/// cancelled: the numbers accepted and cancelled, and the queue's count and bytes at the end.
async fn send_until_cancelled(client: &Node, gap: Duration) -> (Vec<u32>, Vec<u32>, usize, usize) {
    let (mut accepted, mut cancelled) = (Vec::new(), Vec::new());
    for n in 0..300u32 {
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
        match tokio::time::timeout(
            Duration::from_millis(50),
            client.send("hub", common::numbered_event(n, K16)),
        )
        .await
        {
            Ok(r) => {
                r.unwrap();
                accepted.push(n);
            }
            Err(_) => {
                cancelled.push(n);
                if cancelled.len() == 5 {
                    break;
                }
            }
        }
    }
    assert_eq!(cancelled.len(), 5, "no send ever waited");
    let (count, bytes) = queued(client, "hub");
    (accepted, cancelled, count, bytes)
}

/// Receives at `hub` until nothing more comes: every accepted message, in order, once. Of
/// the cancelled sends, at most one may arrive too: the one whose message the medium had begun
/// to take (a write is never cut short midway); a send cancelled while it waited for the
/// queue was never queued.
async fn expect_accepted(hub: &Node, accepted: &[u32], cancelled: &[u32]) {
    let mut got = Vec::new();
    while let Ok(Ok((_, m))) = tokio::time::timeout(Duration::from_millis(500), hub.receive()).await {
        got.push(u32::from_be_bytes(m.payload[..4].try_into().unwrap()));
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order or twice: {got:?}");
    let extra: Vec<u32> = got.iter().copied().filter(|n| !accepted.contains(n)).collect();
    assert!(accepted.iter().all(|n| got.contains(n)), "accepted {accepted:?}, got {got:?}");
    assert!(
        extra.len() <= 1 && extra.iter().all(|n| cancelled.contains(n)),
        "got {extra:?} besides the accepted"
    );
}

/// A send cancelled while it waits for room (a timeout around `send`, the queue full in
/// count) gives its bytes back: what stays charged is what the queue holds. Otherwise every
/// cancelled send would shrink the bound for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_send_gives_its_bytes_back() {
    let (hub, client) = stalled_queue_of_two().await;
    let (accepted, cancelled, count, bytes) = send_until_cancelled(&client, Duration::ZERO).await;
    assert_eq!(count, 2, "the queue holds its two messages");
    assert_eq!(bytes, count * K16, "cancelled sends left their bytes charged");
    // The link still works: what was accepted arrives, in order.
    expect_accepted(&hub, &accepted, &cancelled).await;
    client.close().await;
    hub.close().await;
}

/// Sends spaced wider than the link's idle time are written directly by their senders. Once
/// the peer stops reading, such a write waits for the medium; a sender that gives up must not
/// cut it short, nor leave the link to the next sender's direct write: the write goes on in
/// the background like a writer's batch in hand, later sends queue behind it, and the queue's
/// bounds apply as for any other send. Before this, each timed-out send left its frame in the
/// link's write buffer, outside every bound, with the queue empty, and each such message
/// arrived although its send had failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_direct_write_goes_on_and_later_sends_queue() {
    let (hub, client) = stalled_queue_of_two().await;
    let (accepted, cancelled, count, bytes) = send_until_cancelled(&client, Duration::from_millis(2)).await;
    assert_eq!(
        count, 2,
        "sends were held by the medium instead of the queue (accepted {accepted:?}, cancelled {cancelled:?})"
    );
    assert_eq!(bytes, count * K16);
    expect_accepted(&hub, &accepted, &cancelled).await;
    client.close().await;
    hub.close().await;
}

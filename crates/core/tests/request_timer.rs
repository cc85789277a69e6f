//! Request timeouts and timestamps. The request timer wakes only for a deadline earlier than
//! the one it sleeps until, so a short request sent after a long one must still time out on
//! its own deadline; timestamps come from the monotonic clock plus a wall-clock offset.

mod common;

use std::time::{Duration, Instant};

use hivewire_core::{Node, TransportConfig, TransportError};

async fn pair() -> (Node, Node) {
    common::pair(TransportConfig::default(), TransportConfig::default(), 64 * 1024).await
}

#[tokio::test]
async fn a_short_request_after_a_long_one_times_out_on_its_own_deadline() {
    // The hub never answers: both requests can only end by their timeouts.
    let (hub, client) = pair().await;
    let long = {
        let client = client.clone();
        tokio::spawn(async move { client.request("hub", "slow", &(), Duration::from_secs(30)).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    let short = tokio::time::timeout(
        Duration::from_secs(10),
        client.request("hub", "quick", &(), Duration::from_millis(200)),
    )
    .await
    .expect("the short request ends long before the long one's deadline");
    assert!(matches!(short, Err(TransportError::Timeout)), "{short:?}");
    assert!(started.elapsed() >= Duration::from_millis(200), "not before its deadline");
    // Later deadlines (which wake no timer) still expire, in order.
    let third = tokio::time::timeout(
        Duration::from_secs(10),
        client.request("hub", "third", &(), Duration::from_millis(300)),
    )
    .await
    .expect("the third request ends by its deadline");
    assert!(matches!(third, Err(TransportError::Timeout)), "{third:?}");
    long.abort();
    client.close().await;
    hub.close().await;
}

#[tokio::test]
async fn many_requests_with_one_timeout_all_expire() {
    let (hub, client) = pair().await;
    let mut waits = Vec::new();
    for i in 0..50 {
        let client = client.clone();
        waits.push(tokio::spawn(async move {
            client.request("hub", &format!("m{i}"), &(), Duration::from_millis(100 + i)).await
        }));
    }
    for w in waits {
        let r = tokio::time::timeout(Duration::from_secs(10), w).await.expect("expires").expect("join");
        assert!(matches!(r, Err(TransportError::Timeout)), "{r:?}");
    }
    client.close().await;
    hub.close().await;
}

#[tokio::test]
async fn sent_messages_carry_the_wall_clock() {
    let (hub, client) = pair().await;
    let wall =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    for _ in 0..3 {
        let before = wall();
        client
            .send(
                "hub",
                hivewire_core::Message::new(
                    "client",
                    hivewire_core::MessageType::Event { topic: "t".into() },
                ),
            )
            .await
            .unwrap();
        let (_, got) = tokio::time::timeout(Duration::from_secs(5), hub.receive()).await.unwrap().unwrap();
        let after = wall();
        // Stamped from the monotonic clock plus an offset read at most a second ago: within a
        // millisecond of the wall clock around the send.
        assert!(
            got.timestamp_ms + 1 >= before && got.timestamp_ms <= after + 1,
            "{before} <= {} <= {after}",
            got.timestamp_ms
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    client.close().await;
    hub.close().await;
}

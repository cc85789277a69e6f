//! A hub recomputes the interest it advertises to each peer when a peer unsubscribes, and
//! updates it incrementally when a peer subscribes. The two run in different reader tasks; a
//! recomputation working from a snapshot taken before a concurrent subscribe must not withdraw
//! the pattern that subscribe just added (the publisher would then drop matching events at the
//! source, for good).

mod common;

use std::time::Duration;

use hivewire_core::{Node, TransportConfig};

async fn client(hub: &Node, name: &str, cfg: &TransportConfig) -> Node {
    common::join(hub, name, cfg.clone(), 1 << 20).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subscribe_racing_an_unsubscribe_elsewhere_is_never_withdrawn() {
    const SUBSCRIBERS: usize = 24;
    const ROUNDS: usize = 6;
    let cfg = TransportConfig::default();
    let hub = common::hub(cfg.clone());
    let publisher = client(&hub, "publisher", &cfg).await;
    let mut churners = Vec::new();
    for i in 0..3 {
        churners.push(client(&hub, &format!("churn{i}"), &cfg).await);
    }
    let mut subscribers = Vec::new();
    for i in 0..SUBSCRIBERS {
        subscribers.push(client(&hub, &format!("s{i}"), &cfg).await);
    }
    for round in 0..ROUNDS {
        // Churners make the hub recompute its interest over and over (each unsubscribe) while
        // every subscriber's subscribe arrives.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut churn = Vec::new();
        for (i, c) in churners.iter().enumerate() {
            let (c, stop) = (c.clone(), stop.clone());
            churn.push(tokio::spawn(async move {
                let mut n = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && n < 10_000 {
                    let s = c.subscribe(&format!("churn.{i}.{}", n % 7)).await.expect("churn subscribe");
                    drop(s);
                    n += 1;
                    tokio::task::yield_now().await;
                }
            }));
        }
        let topics: Vec<String> = (0..SUBSCRIBERS).map(|i| format!("r{round}.s{i}")).collect();
        let subs =
            futures::future::join_all(subscribers.iter().zip(&topics).map(|(s, t)| s.subscribe(t))).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for c in churn {
            c.await.expect("churn task");
        }
        let mut subs: Vec<_> = subs.into_iter().map(|s| s.expect("subscribe")).collect();
        // Everything the subscribers and churners sent has been processed by the hub, and
        // everything the hub queued for the publisher before that has reached it.
        for s in subscribers.iter().chain(churners.iter()) {
            s.barrier(Duration::from_secs(10)).await.expect("barrier");
        }
        publisher.barrier(Duration::from_secs(10)).await.expect("publisher barrier");
        for (i, t) in topics.iter().enumerate() {
            publisher.publish(t, &(i as u64)).await.expect("publish");
        }
        for (i, sub) in subs.iter_mut().enumerate() {
            let m = tokio::time::timeout(Duration::from_secs(5), sub.recv())
                .await
                .unwrap_or_else(|_| panic!("round {round}: s{i}'s subscription was withdrawn at the hub"))
                .expect("subscription open");
            assert_eq!(m.topic(), Some(topics[i].as_str()));
        }
    }
    for n in [&publisher, &hub].into_iter().chain(churners.iter()).chain(subscribers.iter()) {
        n.close().await;
    }
}

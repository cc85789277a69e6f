//! A hub that has been closed never admits a peer, even when a link it accepted just before
//! closing completes its handshake afterwards. (Seen as lost messages in the reconnect
//! scenario: a client got HelloAck from the dying hub and sent its queue into it.)

use std::time::Duration;

use hivewire_core::{framed_link, Node, PeerInfo, TransportConfig, TransportError};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_hub_answers_no_hello() {
    let cfg = TransportConfig { connection_timeout_ms: 2_000, ..TransportConfig::default() };
    for round in 0..50 {
        let hub = Node::new("hub", cfg.clone(), "duplex");
        hub.set_hub(true);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let client = Node::new(format!("c{round}"), cfg.clone(), "duplex");
        // The client's Hello is already on its way when the hub closes and then takes the link.
        let dial = {
            let (client, cfg) = (client.clone(), cfg.clone());
            tokio::spawn(async move {
                client
                    .connect_link(framed_link(
                        b,
                        cfg.max_message_size,
                        cfg.compression_threshold,
                        PeerInfo::default(),
                    ))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(1)).await;
        hub.close().await;
        hub.accept_link(framed_link(a, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default()));
        let r =
            tokio::time::timeout(Duration::from_secs(5), dial).await.expect("dial settles").expect("join");
        assert!(
            matches!(
                r,
                Err(TransportError::Closed | TransportError::ConnectionError(_) | TransportError::Io(_))
            ),
            "round {round}: a closed hub admitted a peer: {r:?}"
        );
        assert!(hub.peers().is_empty(), "round {round}: closed hub lists peers");
        client.close().await;
    }
}

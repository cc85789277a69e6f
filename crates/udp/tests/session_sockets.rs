//! The hub gives each session a connected socket of its own: its datagrams then reach the
//! session's link without the listener's demultiplexing. Real sockets on loopback. (A test
//! binary of its own: `hardening` measures the process's RSS.)

use std::time::Duration;

use hivewire_core::{Node, TransportConfig};
use hivewire_udp::{UdpOptions, UdpTransport};
use tokio::net::UdpSocket;

const WAIT: Duration = Duration::from_secs(10);

async fn hub_and_agent(opts: UdpOptions) -> (Node, std::net::SocketAddr, Node) {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), opts.clone()).await.unwrap();
    let addr: std::net::SocketAddr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    let agent = UdpTransport::connect(&addr.to_string(), "good", cfg, opts).await.unwrap();
    (hub, addr, agent)
}

async fn still_served(agent: &Node) {
    let r = agent.request("hub", "echo", &"still here", WAIT).await.expect("the hub stopped serving others");
    assert_eq!(r.payload_as::<String>().unwrap(), "still here");
}

fn counter(node: &Node, name: &str) -> u64 {
    node.stats()
        .backend
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reads_its_own_socket_on_the_hub() {
    let (hub, _addr, agent) = hub_and_agent(UdpOptions::default()).await;
    assert_eq!(counter(&hub, "udp.session_sockets"), 1, "{:?}", hub.stats().backend);
    let before = counter(&hub, "udp.via_listener");
    for i in 0..200u32 {
        let r = agent.request("hub", "echo", &i, WAIT).await.unwrap();
        assert_eq!(r.payload_as::<u32>().unwrap(), i);
    }
    // The kernel hands the agent's datagrams to the session's connected socket: the
    // listener's demultiplexer saw none of these 200 requests (heartbeats aside, none at all).
    let via = counter(&hub, "udp.via_listener") - before;
    assert!(via < 10, "{via} datagrams went through the listener: {:?}", hub.stats().backend);
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_hub_cannot_take_a_listening_port() {
    let (hub, addr, agent) = hub_and_agent(UdpOptions::default()).await;
    let second =
        UdpTransport::listen(&addr.to_string(), "thief", TransportConfig::default(), UdpOptions::default())
            .await;
    assert!(second.is_err(), "a second hub joined the port");
    still_served(&agent).await;
    hub.close().await;
}

/// Relays one client's datagrams to `hub` from a first socket, then, once `switch` is set,
/// from a second one (a NAT rebinding, as the hub sees it); the hub's answers to either go
/// back to the client.
async fn rebinding_relay(
    hub: std::net::SocketAddr,
    switch: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::net::SocketAddr {
    use std::sync::Arc;
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let ups = [
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
        Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
    ];
    let addr = front.local_addr().unwrap();
    let client = Arc::new(std::sync::Mutex::new(None));
    for up in &ups {
        let (up, front, client) = (up.clone(), front.clone(), client.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, _)) = up.recv_from(&mut buf).await {
                let to = *client.lock().unwrap();
                if let Some(c) = to {
                    let _ = front.send_to(&buf[..n], c).await;
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = front.recv_from(&mut buf).await {
            *client.lock().unwrap() = Some(from);
            let up = &ups[usize::from(switch.load(std::sync::atomic::Ordering::Relaxed))];
            let _ = up.send_to(&buf[..n], hub).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_moves_to_another_address_keeps_its_link() {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), UdpOptions::default()).await.unwrap();
    let hub_addr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    let switch = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let via = rebinding_relay(hub_addr, switch.clone()).await;
    let agent = UdpTransport::connect(&via.to_string(), "agent", cfg, UdpOptions::default()).await.unwrap();
    still_served(&agent).await;
    let before = counter(&hub, "udp.via_listener");
    switch.store(true, std::sync::atomic::Ordering::Relaxed);
    // From the new address the session's datagrams reach the listener (its own socket is
    // connected to the old one), and the answers go to the new address.
    for i in 0..50u32 {
        let r = agent.request("hub", "echo", &i, WAIT).await.unwrap();
        assert_eq!(r.payload_as::<u32>().unwrap(), i);
    }
    assert!(counter(&hub, "udp.via_listener") - before >= 50, "{:?}", hub.stats().backend);
    assert_eq!(hub.peers().len(), 1, "the moved session is still the one peer");
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_hub_leaves_its_port_free_for_the_next() {
    let (hub, addr, agent) = hub_and_agent(UdpOptions::default()).await;
    still_served(&agent).await;
    assert_eq!(counter(&hub, "udp.session_sockets"), 1);
    hub.close().await;
    // The session's socket went with its link: a new hub binds the same port at once.
    let again =
        UdpTransport::listen(&addr.to_string(), "hub", TransportConfig::default(), UdpOptions::default())
            .await
            .expect("the port is still held after close");
    again.close().await;
}

/// Relays one client's datagrams to `hub` from a first socket; `rebind()` closes that socket
/// and relays from a second one from then on (the session's old address is gone for good, so
/// datagrams sent to it come back as ICMP port-unreachable).
struct ClosingRelay {
    addr: std::net::SocketAddr,
    first: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<UdpSocket>>>>,
    first_reader: tokio::task::JoinHandle<()>,
}

impl ClosingRelay {
    async fn start(hub: std::net::SocketAddr) -> ClosingRelay {
        use std::sync::{Arc, Mutex};
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let (a, b) = (
            Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
            Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap()),
        );
        let client = Arc::new(Mutex::new(None));
        let back = |up: Arc<UdpSocket>| {
            let (front, client) = (front.clone(), client.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                while let Ok((n, _)) = up.recv_from(&mut buf).await {
                    let to = *client.lock().unwrap();
                    if let Some(c) = to {
                        let _ = front.send_to(&buf[..n], c).await;
                    }
                }
            })
        };
        let first_reader = back(a.clone());
        drop(back(b.clone()));
        let first = Arc::new(Mutex::new(Some(a)));
        let addr = front.local_addr().unwrap();
        let chosen = first.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            while let Ok((n, from)) = front.recv_from(&mut buf).await {
                *client.lock().unwrap() = Some(from);
                let up = chosen.lock().unwrap().clone().unwrap_or_else(|| b.clone());
                let _ = up.send_to(&buf[..n], hub).await;
            }
        });
        ClosingRelay { addr, first, first_reader }
    }

    async fn rebind(&mut self) {
        self.first_reader.abort();
        let _ = (&mut self.first_reader).await;
        self.first.lock().unwrap().take();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_old_address_closed_keeps_its_link() {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let hub = UdpTransport::listen("127.0.0.1:0", "hub", cfg.clone(), UdpOptions::default()).await.unwrap();
    let hub_addr = hub.listen_url().unwrap().trim_start_matches("udp://").parse().unwrap();
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    let mut relay = ClosingRelay::start(hub_addr).await;
    let agent =
        UdpTransport::connect(&relay.addr.to_string(), "agent", cfg, UdpOptions::default()).await.unwrap();
    still_served(&agent).await;
    relay.rebind().await;
    // The hub still sends to the old address, through the session's own socket: the ICMP
    // errors that come back must not end the session.
    for i in 0..20u64 {
        hub.send("agent", hivewire_core::Message::event("hub", "t", &i).unwrap()).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..20u32 {
        let r = agent.request("hub", "echo", &i, WAIT).await.unwrap();
        assert_eq!(r.payload_as::<u32>().unwrap(), i);
    }
    assert_eq!(hub.peers().len(), 1, "the session is still the one peer");
    hub.close().await;
}

//! The hub gives each session a connected socket of its own: its datagrams then reach the
//! session's link without the listener's demultiplexing. Real sockets on loopback. (A test
//! binary of its own: `hardening` measures the process's RSS.)

use std::time::Duration;

use hivewire_core::TransportConfig;
use hivewire_udp::{UdpOptions, UdpTransport};
use tokio::net::UdpSocket;

mod common;
use common::{counter, echo_hub, hub_and_agent, still_served, WAIT};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_moves_to_another_address_keeps_its_link() {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let (hub, hub_addr) = echo_hub(cfg.clone(), UdpOptions::default()).await;
    let mut relay = Relay::start(hub_addr).await;
    let agent =
        UdpTransport::connect(&relay.addr.to_string(), "agent", cfg, UdpOptions::default()).await.unwrap();
    still_served(&agent).await;
    let before = counter(&hub, "udp.via_listener");
    relay.rebind(false).await;
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

/// Relays one client's datagrams to `hub` from a first socket, and after `rebind` from a
/// second one (a NAT rebinding, as the hub sees it); the hub's answers to either go back to the
/// client. `rebind(true)` also closes the first socket: the session's old address is then gone
/// for good, and datagrams sent to it come back as ICMP port-unreachable.
struct Relay {
    addr: std::net::SocketAddr,
    first: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<UdpSocket>>>>,
    first_reader: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(hub: std::net::SocketAddr) -> Relay {
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
        Relay { addr, first, first_reader }
    }

    async fn rebind(&mut self, close: bool) {
        if close {
            self.first_reader.abort();
            let _ = (&mut self.first_reader).await;
        }
        self.first.lock().unwrap().take();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_old_address_closed_keeps_its_link() {
    let cfg = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    let (hub, hub_addr) = echo_hub(cfg.clone(), UdpOptions::default()).await;
    let mut relay = Relay::start(hub_addr).await;
    let agent =
        UdpTransport::connect(&relay.addr.to_string(), "agent", cfg, UdpOptions::default()).await.unwrap();
    still_served(&agent).await;
    relay.rebind(true).await;
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

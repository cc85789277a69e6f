//! QUIC on loopback with certificates generated in the test: multiplexing, datagrams,
//! certificate checks, and hostile datagrams against a listener that keeps serving.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire_core::test_pki::{generate, TestPki};
use hivewire_core::{Message, MessageType, Node, TransportConfig, TransportError};
use hivewire_quic::{QuicOptions, QuicTransport, BEST_EFFORT_HEADER};

const WAIT: Duration = Duration::from_secs(20);

fn server_cfg(pki: &TestPki) -> TransportConfig {
    let mut c = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    c.tls.cert_chain_pem = Some(pki.server.cert_pem.clone().into_bytes());
    c.tls.key_pem = Some(pki.server.key_pem.clone().into_bytes());
    c
}

fn client_cfg(pki: &TestPki) -> TransportConfig {
    let mut c = TransportConfig { connection_timeout_ms: 3_000, ..TransportConfig::default() };
    c.tls.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    c
}

async fn hub(pki: &TestPki, cfg: TransportConfig) -> (Node, String) {
    let hub = QuicTransport::listen("127.0.0.1:0", "hub", cfg, QuicOptions::default()).await.expect("listen");
    let port = hub.listen_url().unwrap().rsplit(':').next().unwrap().to_string();
    let _ = pki;
    (hub, format!("localhost:{port}"))
}

fn spawn_echo(hub: &Node) {
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            if req.method().is_some() {
                let _ = responder.respond_bytes(&req, req.payload.clone()).await;
            }
        }
    });
}

/// A hub loop that answers requests at once (echo) and notes when the event of `big` bytes
/// has arrived.
struct LargeArrival(Arc<std::sync::Mutex<Option<Instant>>>);

impl LargeArrival {
    fn serve(hub: &Node, big: usize) -> LargeArrival {
        let done: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
        let (hub, noted) = (hub.clone(), done.clone());
        tokio::spawn(async move {
            while let Ok((_, m)) = hub.receive().await {
                if m.method().is_some() {
                    let _ = hub.respond_bytes(&m, m.payload.clone()).await;
                } else if m.payload.len() == big {
                    *noted.lock().unwrap() = Some(Instant::now());
                }
            }
        });
        LargeArrival(done)
    }

    /// When the large event arrived (waits for it, at most `WAIT`).
    async fn wait(&self) -> Instant {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(t) = *self.0.lock().unwrap() {
                return t;
            }
            assert!(Instant::now() < deadline, "the large event never arrived");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_request_overtakes_a_50_mib_message_in_flight() {
    let pki = generate().unwrap();
    let big = 50 << 20;
    let cfg = |c: TransportConfig| TransportConfig { max_message_size: 64 << 20, ..c };
    let (hub, addr) = hub(&pki, cfg(server_cfg(&pki))).await;
    // The hub answers requests at once and notes when the large event has arrived.
    let large_done = LargeArrival::serve(&hub, big);
    let agent =
        QuicTransport::connect(&addr, "agent", cfg(client_cfg(&pki)), QuicOptions::default()).await.unwrap();
    let large = Message::new("agent", MessageType::Event { topic: "bulk".into() })
        .with_payload_bytes(Bytes::from(vec![1u8; big]));
    agent.send("hub", large).await.unwrap();
    // Give the transfer a head start, then ask something small.
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = agent.request("hub", "echo", &"small", WAIT).await.expect("small request");
    let answered = Instant::now();
    assert_eq!(r.payload_as::<String>().unwrap(), "small");
    // The large transfer completes afterwards.
    let done = large_done.wait().await;
    assert!(
        answered < done,
        "the small request waited for the large transfer ({:?} after it)",
        answered - done
    );
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_messages_travel_as_datagrams_and_arrive_on_loopback() {
    let pki = generate().unwrap();
    let (hub, addr) = hub(&pki, server_cfg(&pki)).await;
    let agent =
        QuicTransport::connect(&addr, "agent", client_cfg(&pki), QuicOptions::default()).await.unwrap();
    let mut got = 0;
    for i in 0..50u32 {
        let m = Message::new("agent", MessageType::Event { topic: "telemetry".into() })
            .with_payload_bytes(Bytes::from(i.to_be_bytes().to_vec()))
            .with_header(BEST_EFFORT_HEADER, "1");
        agent.send("hub", m).await.unwrap();
    }
    // Unreliable by declaration; on an idle loopback all or nearly all arrive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && got < 50 {
        if let Ok(Ok((_, m))) = tokio::time::timeout(Duration::from_millis(500), hub.receive()).await {
            assert_eq!(m.topic(), Some("telemetry"));
            assert_eq!(m.payload.len(), 4);
            got += 1;
        }
    }
    assert!(got >= 40, "only {got} of 50 datagrams arrived on loopback");
    // A best-effort message too large for a datagram goes reliably.
    let m = Message::new("agent", MessageType::Event { topic: "big".into() })
        .with_payload_bytes(Bytes::from(vec![5u8; 10_000]))
        .with_header(BEST_EFFORT_HEADER, "1");
    agent.send("hub", m).await.unwrap();
    let (_, m) = tokio::time::timeout(WAIT, hub.receive()).await.unwrap().unwrap();
    assert_eq!(m.payload.len(), 10_000);
    agent.close().await;
    hub.close().await;
}

#[tokio::test]
async fn certificates_are_verified_by_default() {
    let pki = generate().unwrap();
    let (hub, addr) = hub(&pki, server_cfg(&pki)).await;
    let other = generate().unwrap();
    let r = QuicTransport::connect(&addr, "x", client_cfg(&other), QuicOptions::default()).await;
    assert!(matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("QUIC")), "{r:?}");
    let mut no_ca = client_cfg(&pki);
    no_ca.tls.ca_pem = None;
    let r = QuicTransport::connect(&addr, "y", no_ca, QuicOptions::default()).await;
    assert!(matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("ca_pem")), "{r:?}");
    let mut dangerous = client_cfg(&other);
    dangerous.tls.dangerous_accept_any_server_certificate = true;
    let r = QuicTransport::connect(&addr, "z", dangerous, QuicOptions::default()).await;
    assert!(r.is_ok(), "{r:?}");
    hub.close().await;
}

#[tokio::test]
async fn mutual_tls_shows_the_client_identity() {
    let pki = generate().unwrap();
    let mut server = server_cfg(&pki);
    server.tls.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    server.tls.require_client_cert = true;
    let (hub, addr) = hub(&pki, server).await;
    let r = QuicTransport::connect(&addr, "anon", client_cfg(&pki), QuicOptions::default()).await;
    assert!(r.is_err(), "a client without a certificate got in");
    let mut with_cert = client_cfg(&pki);
    with_cert.tls.client_cert_pem = Some(pki.client.cert_pem.clone().into_bytes());
    with_cert.tls.client_key_pem = Some(pki.client.key_pem.clone().into_bytes());
    let c = QuicTransport::connect(&addr, "known", with_cert, QuicOptions::default()).await.expect("mTLS");
    let info = hub.peer_info("known").unwrap();
    assert_eq!(info.attributes.get(hivewire_core::tls::CLIENT_CERT_SHA256).map(String::len), Some(64));
    c.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_datagrams_do_not_disturb_the_listener() {
    let pki = generate().unwrap();
    let (hub, addr) = hub(&pki, server_cfg(&pki)).await;
    spawn_echo(&hub);
    let agent =
        QuicTransport::connect(&addr, "good", client_cfg(&pki), QuicOptions::default()).await.unwrap();
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    for i in 0..2_000 {
        let len = rng.usize(1..1400);
        let mut d: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        if i % 2 == 0 {
            d[0] |= 0xC0; // looks like a QUIC long header (Initial), with garbage after it
        }
        sock.send_to(&d, ("127.0.0.1", port)).await.unwrap();
    }
    let r = agent.request("hub", "echo", &"still here", WAIT).await.expect("the listener stopped serving");
    assert_eq!(r.payload_as::<String>().unwrap(), "still here");
    // And a new client still gets in.
    let late = QuicTransport::connect(&addr, "late", client_cfg(&pki), QuicOptions::default()).await;
    assert!(late.is_ok(), "{late:?}");
    agent.close().await;
    hub.close().await;
}

#[tokio::test]
async fn the_wrong_alpn_is_refused() {
    let pki = generate().unwrap();
    let (hub, addr) = hub(&pki, server_cfg(&pki)).await;
    // A raw quinn client speaking another protocol.
    let mut tls = (*hivewire_core::tls::client_config(&client_cfg(&pki).tls).unwrap()).clone();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let port: u16 = addr.rsplit(':').next().unwrap().parse().unwrap();
    let r = ep.connect(([127, 0, 0, 1], port).into(), "localhost").unwrap().await;
    assert!(r.is_err(), "a client with ALPN h3 was accepted");
    hub.close().await;
}

#[tokio::test]
async fn a_closed_listener_frees_its_port_for_a_new_one() {
    let pki = generate().unwrap();
    let (hub1, addr) = hub(&pki, server_cfg(&pki)).await;
    let c = QuicTransport::connect(&addr, "c", client_cfg(&pki), QuicOptions::default()).await.unwrap();
    hub1.close().await;
    let bind = addr.replace("localhost", "127.0.0.1");
    let hub2 = QuicTransport::listen(&bind, "hub", server_cfg(&pki), QuicOptions::default()).await;
    assert!(hub2.is_ok(), "{hub2:?}");
    // A live listener's port is not taken.
    let third = QuicTransport::listen(&bind, "hub3", server_cfg(&pki), QuicOptions::default()).await;
    assert!(
        matches!(&third, Err(TransportError::ConnectionError(m)) if m.contains("cannot listen")),
        "{third:?}"
    );
    c.close().await;
    hub2.unwrap().close().await;
}

/// A hub whose reader is stalled (its inbox of one holds an event, and it waits to deliver a
/// second: nobody receives until the test says so), with `opts` for its windows, and an agent
/// connected to it. `max` is both sides' `max_message_size`.
async fn stalled_hub(pki: &TestPki, opts: QuicOptions, max: usize) -> (Node, Node) {
    stalled_hub_with(pki, opts, QuicOptions::default(), max).await
}

/// [`stalled_hub`] with `agent_opts` for the agent's side.
async fn stalled_hub_with(
    pki: &TestPki,
    opts: QuicOptions,
    agent_opts: QuicOptions,
    max: usize,
) -> (Node, Node) {
    let hub_cfg = TransportConfig { inbound_queue_capacity: 1, max_message_size: max, ..server_cfg(pki) };
    let hub = QuicTransport::listen("127.0.0.1:0", "hub", hub_cfg, opts).await.expect("listen");
    let port = hub.listen_url().unwrap().rsplit(':').next().unwrap().to_string();
    let agent_cfg = TransportConfig { max_message_size: max, ..client_cfg(pki) };
    let agent = QuicTransport::connect(&format!("localhost:{port}"), "agent", agent_cfg, agent_opts)
        .await
        .expect("connect");
    for i in 0..2u64 {
        agent.send("hub", Message::event("agent", "fill", &i).unwrap()).await.expect("fill the inbox");
    }
    // Once the hub has read both, its reader waits for room in the inbox (the first fills it).
    let deadline = Instant::now() + WAIT;
    while hub.stats().messages_received < 2 {
        assert!(Instant::now() < deadline, "the hub never read the two events");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (hub, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_abandoned_mid_write_does_not_break_the_connection() {
    let pki = generate().unwrap();
    // A hub whose reader holds back, so QUIC flow control stops a large request part-way
    // through its stream.
    let opts = QuicOptions { connection_window: 8 << 10, stream_window: 8 << 10, ..QuicOptions::default() };
    let (hub, agent) = stalled_hub(&pki, opts, TransportConfig::default().max_message_size).await;
    let mut hub_events = hub.peer_events();
    // Under LARGE_FRAME, so the caller's own task writes it (a larger one gets a task of its own).
    let big = Bytes::from(vec![9u8; hivewire_quic::LARGE_FRAME - 16 * 1024]);
    let req = Message::new("agent", MessageType::Request { method: "echo".into() }).with_payload_bytes(big);
    let abandoned =
        tokio::time::timeout(Duration::from_millis(300), agent.request_message("hub", req, WAIT)).await;
    assert!(abandoned.is_err(), "the large request must still be blocked by flow control when abandoned");
    // The hub drains its inbox and answers; the connection must have survived the abandoned
    // stream: the next request is answered, and neither side saw the link fail.
    spawn_echo(&hub);
    let r = agent.request("hub", "echo", &"after", WAIT).await.expect("request after an abandoned one");
    assert_eq!(r.payload_as::<String>().unwrap(), "after");
    assert_eq!(hub.stats().errors, 0, "the hub counted a broken frame or link");
    assert_eq!(agent.stats().errors, 0, "the agent counted a failed link");
    while let Ok(ev) = hub_events.try_recv() {
        assert!(!matches!(ev, hivewire_core::PeerEvent::Down { .. }), "the link went down: {ev:?}");
    }
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waits_for_a_stream_while_every_stream_is_taken() {
    let pki = generate().unwrap();
    // The agent may have one stream open at a time. The hub's reader stalls and its windows
    // are small, so flow control holds the first request part-way through its stream, which
    // keeps that one stream until the hub reads.
    let opts = QuicOptions { connection_window: 8 << 10, stream_window: 8 << 10, ..QuicOptions::default() };
    let one_stream = QuicOptions { max_concurrent_streams: 1, ..QuicOptions::default() };
    let (hub, agent) =
        stalled_hub_with(&pki, opts, one_stream, TransportConfig::default().max_message_size).await;
    let request = |len: usize, tag: u8| {
        Message::new("agent", MessageType::Request { method: "echo".into() })
            .with_payload_bytes(Bytes::from(vec![tag; len]))
    };
    let sent_before = agent.stats().messages_sent;
    // Under LARGE_FRAME: written by the sender itself (`try_send_now`), its rest by a task once
    // the window opens.
    let first = {
        let (agent, req) = (agent.clone(), request(hivewire_quic::LARGE_FRAME - 16 * 1024, 1));
        tokio::spawn(async move { agent.request_message("hub", req, WAIT).await })
    };
    let deadline = Instant::now() + WAIT;
    while agent.stats().messages_sent == sent_before {
        assert!(Instant::now() < deadline, "the first request was never written");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The only stream is taken: the second request's direct write is declined, and it waits
    // for the stream instead of opening another one or failing.
    let second = {
        let (agent, req) = (agent.clone(), request(16, 2));
        tokio::spawn(async move { agent.request_message("hub", req, WAIT).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!second.is_finished(), "the second request finished while the hub was stalled");
    assert_eq!(
        agent.stats().messages_sent,
        sent_before + 1,
        "the second request went out while the only stream was taken"
    );
    // The hub reads and answers: the first stream completes, frees the stream, and the second
    // request goes out on it.
    spawn_echo(&hub);
    for (task, tag, len) in [(first, 1u8, hivewire_quic::LARGE_FRAME - 16 * 1024), (second, 2, 16)] {
        let r = task.await.unwrap().expect("answered");
        assert_eq!(r.payload.len(), len);
        assert!(r.payload.iter().all(|&b| b == tag), "request {tag} answered with another's payload");
    }
    assert_eq!(agent.stats().messages_sent, sent_before + 2);
    assert_eq!(agent.stats().errors, 0);
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_not_held_behind_an_event_that_flow_control_holds_back() {
    let pki = generate().unwrap();
    let big = 20 << 20;
    // The hub's reader stalls and its stream window is 1 MiB, so QUIC holds back almost all of
    // a 20 MiB event on the main stream; the connection's window (8 MiB) leaves room for other
    // streams, as QUIC multiplexing needs.
    let opts = QuicOptions { connection_window: 8 << 20, stream_window: 1 << 20, ..QuicOptions::default() };
    let (hub, agent) = stalled_hub(&pki, opts, 32 << 20).await;
    // The event is sent (and held back) first, then a request, both while the hub is stalled.
    let large = Message::new("agent", MessageType::Event { topic: "bulk".into() })
        .with_payload_bytes(Bytes::from(vec![1u8; big]));
    let sender = agent.clone();
    let bulk = tokio::spawn(async move { sender.send("hub", large).await });
    // The event waits for the peer on the main stream's own writer, not in the link's writer:
    // its send completes while the hub is still stalled (before the fix it could not, until the
    // hub read nearly all of it).
    let deadline = Instant::now() + WAIT;
    while !bulk.is_finished() {
        assert!(Instant::now() < deadline, "the held-back event still holds the link's writer");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sent_before = agent.stats().messages_sent;
    let requester = agent.clone();
    let request = tokio::spawn(async move { requester.request("hub", "echo", &"small", WAIT).await });
    // The request goes out on a stream of its own while the hub is still stalled.
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = agent.stats();
        let queued: usize = stats.peers.iter().map(|p| p.queued).sum();
        if queued == 0 && stats.messages_sent > sent_before {
            break;
        }
        assert!(Instant::now() < deadline, "the request is stuck in the agent's queue");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Now the hub reads: it answers requests and notes when the large event has arrived.
    let large_done = LargeArrival::serve(&hub, big);
    let r = request.await.unwrap().expect("small request");
    let answered = Instant::now();
    assert_eq!(r.payload_as::<String>().unwrap(), "small");
    bulk.await.unwrap().expect("the large event is accepted");
    let done = large_done.wait().await;
    assert!(answered < done, "the request waited for the held-back event ({:?} after it)", answered - done);
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_held_back_by_flow_control_queue_up_to_the_main_budget() {
    use hivewire_quic::{MAIN_BUDGET, MAIN_ENVELOPE};
    let pki = generate().unwrap();
    let opts = QuicOptions { connection_window: 8 << 20, stream_window: 1 << 20, ..QuicOptions::default() };
    let (hub, agent) = stalled_hub(&pki, opts, 16 << 20).await;
    let event = |len: usize, tag: u8| {
        Message::new("agent", MessageType::Event { topic: "bulk".into() })
            .with_payload_bytes(Bytes::from(vec![tag; len]))
    };
    // At the budget: two events that fill it exactly are both taken while the hub is stalled.
    let half = MAIN_BUDGET / 2 - MAIN_ENVELOPE;
    for tag in [1u8, 2] {
        tokio::time::timeout(WAIT, agent.send("hub", event(half, tag)))
            .await
            .expect("an event within the budget waits for nobody")
            .expect("send");
    }
    // Past it: the next event waits until the hub reads.
    let sender = agent.clone();
    let third = tokio::spawn(async move { sender.send("hub", event(1024, 3)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!third.is_finished(), "an event past the budget was taken while the main stream is held");
    // The hub reads: everything arrives, in order.
    let mut got = Vec::new();
    while got.len() < 5 {
        let (_, m) = tokio::time::timeout(WAIT, hub.receive()).await.expect("hub receives").expect("receive");
        got.push(m.payload.first().copied().unwrap_or(0));
    }
    third.await.unwrap().expect("the third event is sent once there is room");
    assert_eq!(&got[2..], &[1, 2, 3], "events in order (the first two are the fillers)");
    agent.close().await;
    hub.close().await;
}

//! Behaviour of the shared-memory backend: same-process and cross-process (the test binary
//! re-executed as a child with `HW_SHM_CHILD` set), limits, stale listeners, cleanup.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use hivewire_core::{Message, Node, PeerEvent, TransportConfig, TransportError};
use hivewire_shm::{max_payload_for_ring, SharedMemoryInfo, SharedMemoryTransport, ShmMode};

const WAIT: Duration = Duration::from_secs(10);
const CHILD_ENV: &str = "HW_SHM_CHILD";

fn unique_name() -> String {
    format!("hwtest-{}-{:08x}", std::process::id(), fastrand::u32(..))
}

/// Our entries in /dev/shm for `name`.
fn shm_entries(name: &str) -> Vec<String> {
    let control = format!("hw-{name}");
    let prefix = format!("hw-{name}.");
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .filter(|f| *f == control || f.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn lock_file(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join("hivewire-shm").join(format!("{name}.lock"))
}

fn small() -> SharedMemoryInfo {
    SharedMemoryInfo { ring_buffer_size: 64 * 1024, ..SharedMemoryInfo::default() }
}

fn cfg() -> TransportConfig {
    TransportConfig { heartbeat_interval_ms: 200, heartbeat_timeout_ms: 2000, ..TransportConfig::default() }
}

fn spawn_echo(node: &Node) {
    let n = node.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = n.receive().await {
            if req.is_request() {
                let _ = n.respond_bytes(&req, req.payload.clone()).await;
            }
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_in_one_process() {
    let name = unique_name();
    let hub = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
    assert_eq!(hub.listen_url().as_deref(), Some(format!("shm://{name}").as_str()));
    let agent = SharedMemoryTransport::connect(&format!("shm://{name}"), "agent", cfg()).await.unwrap();
    assert_eq!(hub.peers().len(), 1);
    assert_eq!(hub.peer_info("agent").unwrap().attributes.get("pid"), Some(&std::process::id().to_string()));
    spawn_echo(&hub);
    for i in 0..200u64 {
        let resp = agent.request("hub", "echo", &i, WAIT).await.unwrap();
        assert_eq!(resp.payload_as::<u64>().unwrap(), i);
    }
    // And the other way round: the hub asks the agent.
    spawn_echo(&agent);
    let resp = hub.request("agent", "echo", &"back", WAIT).await.unwrap();
    assert_eq!(resp.payload_as::<String>().unwrap(), "back");
    agent.close().await;
    hub.close().await;
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_with_modes_and_pubsub_through_the_hub() {
    let name = unique_name();
    let info = SharedMemoryInfo { name: name.clone(), ..small() };
    let hub = SharedMemoryTransport::new(info.clone(), "hub", cfg(), ShmMode::Listen).await.unwrap();
    let publisher = SharedMemoryTransport::new(info.clone(), "pub", cfg(), ShmMode::Connect).await.unwrap();
    let subscriber = SharedMemoryTransport::new(info, "sub", cfg(), ShmMode::Connect).await.unwrap();
    let mut temps = subscriber.subscribe("sensors.*.temp").await.unwrap();
    subscriber.barrier(WAIT).await.unwrap();
    publisher.barrier(WAIT).await.unwrap();
    publisher.publish("sensors.arm.temp", &1u64).await.unwrap();
    publisher.publish("sensors.arm.pressure", &2u64).await.unwrap();
    publisher.publish("sensors.leg.temp", &3u64).await.unwrap();
    for want in [1u64, 3] {
        let m = tokio::time::timeout(WAIT, temps.recv()).await.unwrap().unwrap();
        assert_eq!(m.payload_as::<u64>().unwrap(), want);
    }
    // Agent to agent through the hub.
    spawn_echo(&subscriber);
    let resp = publisher.request("sub", "echo", &"via hub", WAIT).await.unwrap();
    assert_eq!(resp.payload_as::<String>().unwrap(), "via hub");
    publisher.close().await;
    subscriber.close().await;
    hub.close().await;
    assert!(shm_entries(&name).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_at_the_limit_passes_one_past_it_is_refused() {
    let name = unique_name();
    let capacity = small().ring_capacity();
    let max = max_payload_for_ring(capacity);
    assert_eq!(capacity, 64 * 1024);
    assert!(max > 8 * 1024 && max < capacity / 2, "{max}");
    let hub = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
    let agent = SharedMemoryTransport::connect(&name, "agent", cfg()).await.unwrap();
    assert_eq!(agent.config().max_message_size, max, "the node's limit is lowered to the ring's");
    assert_eq!(hub.config().max_message_size, max);
    spawn_echo(&hub);
    let payload = Bytes::from(vec![0xA5u8; max]);
    let req = Message::request("agent", "echo", &()).unwrap().with_payload_bytes(payload.clone());
    let resp = agent.request_message("hub", req, WAIT).await.unwrap();
    assert_eq!(resp.payload, payload);

    let too_big = Bytes::from(vec![0u8; max + 1]);
    let req = Message::request("agent", "echo", &()).unwrap().with_payload_bytes(too_big);
    match agent.request_message("hub", req, WAIT).await {
        Err(TransportError::MessageTooLarge { size, max: m }) => assert_eq!((size, m), (max + 1, max)),
        other => panic!("expected MessageTooLarge, got {other:?}"),
    }
    // The link is still usable.
    let resp = agent.request("hub", "echo", &7u64, WAIT).await.unwrap();
    assert_eq!(resp.payload_as::<u64>().unwrap(), 7);
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_larger_than_the_ring_arrives_in_order() {
    let name = unique_name();
    let hub = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
    let agent = SharedMemoryTransport::connect(&name, "agent", cfg()).await.unwrap();
    const N: u64 = 20_000;
    let sender = agent.clone();
    let send = tokio::spawn(async move {
        for i in 0..N {
            // ~1 KiB each: the 64 KiB ring fills and wraps many times.
            let payload = Bytes::from(vec![(i % 251) as u8; 1000 + (i % 24) as usize]);
            let msg = Message::event("agent", "stream", &()).unwrap().with_payload_bytes(payload);
            sender.send("hub", msg.with_header("i", i.to_string())).await.unwrap();
        }
    });
    for i in 0..N {
        let (from, m) = tokio::time::timeout(WAIT, hub.receive()).await.unwrap().unwrap();
        assert_eq!(from.as_str(), "agent");
        assert_eq!(m.headers.get("i").map(String::as_str), Some(i.to_string().as_str()));
        assert_eq!(m.payload.len(), 1000 + (i % 24) as usize);
        assert!(m.payload.iter().all(|&b| b == (i % 251) as u8), "payload {i} corrupted");
    }
    send.await.unwrap();
    agent.close().await;
    hub.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_name_is_refused_and_nothing_is_left_in_dev_shm() {
    let name = unique_name();
    let hub = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
    assert_eq!(shm_entries(&name), vec![format!("hw-{name}")]);
    assert!(lock_file(&name).exists());
    let second = SharedMemoryTransport::listen(&name, "hub2", cfg(), small()).await;
    assert!(
        matches!(second, Err(TransportError::ConnectionError(ref m)) if m.contains("address in use")),
        "{second:?}"
    );
    assert!(matches!(SharedMemoryTransport::cleanup(&name), Err(TransportError::ConnectionError(_))));
    let a = SharedMemoryTransport::connect(&name, "a", cfg()).await.unwrap();
    let b = SharedMemoryTransport::connect(&name, "b", cfg()).await.unwrap();
    assert_eq!(hub.peers().len(), 2);
    // Connection segments are unlinked as soon as the listener maps them.
    assert_eq!(shm_entries(&name), vec![format!("hw-{name}")]);
    spawn_echo(&hub);
    assert_eq!(a.request("hub", "echo", &1u64, WAIT).await.unwrap().payload_as::<u64>().unwrap(), 1);
    assert_eq!(b.request("hub", "echo", &2u64, WAIT).await.unwrap().payload_as::<u64>().unwrap(), 2);
    a.close().await;
    b.close().await;
    hub.close().await;
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
    assert!(!lock_file(&name).exists(), "lock file removed on close");
    // The name is free again.
    let again = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
    again.close().await;
    assert!(shm_entries(&name).is_empty());
}

#[tokio::test]
async fn bad_names_and_missing_listeners_are_typed_errors() {
    for bad in ["", "shm://", "a/b", "a.b", "x y", &"n".repeat(101)] {
        let r = SharedMemoryTransport::listen(bad, "hub", cfg(), small()).await;
        assert!(matches!(r, Err(TransportError::InvalidUrl { .. })), "{bad:?}: {r:?}");
    }
    let r = SharedMemoryTransport::connect(&unique_name(), "a", cfg()).await;
    assert!(
        matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("no live listener")),
        "{r:?}"
    );
}

// ----- cross-process -----------------------------------------------------------------------

/// Kills the child on drop, so that a failing test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Re-executes this test binary as a child running `child_main` with `role`; returns once the
/// child printed `HW-READY`.
fn spawn_child(role: &str) -> ChildGuard {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["--exact", "child_main", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let guard = ChildGuard(child);
    let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
    // Read (and keep draining, so that the child never blocks on a full pipe) its stdout.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            match line {
                Ok(l) if l.contains("HW-READY") => {
                    let _ = ready_tx.try_send(());
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
        panic!("child {role} did not get ready");
    }
    guard
}

/// The child's side: does nothing unless re-executed by `spawn_child`.
#[test]
fn child_main() {
    let Ok(role) = std::env::var(CHILD_ENV) else { return };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let (what, name) = role.split_once(':').unwrap();
        match what {
            "listen" => {
                let hub = SharedMemoryTransport::listen(name, "child-hub", cfg(), small()).await.unwrap();
                println!("HW-READY");
                while let Ok((_, req)) = hub.receive().await {
                    if !req.is_request() {
                        continue;
                    }
                    if req.method() == Some("exit") {
                        hub.respond(&req, &"bye").await.unwrap();
                        break;
                    }
                    hub.respond_bytes(&req, req.payload.clone()).await.unwrap();
                }
                hub.close().await;
            }
            "connect" => {
                let agent = SharedMemoryTransport::connect(name, "child-agent", cfg()).await.unwrap();
                println!("HW-READY");
                // Stream until killed.
                let mut i = 0u64;
                loop {
                    let _ = agent.publish("tick", &i).await;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            "stream" => {
                // Streams STREAM_N events of varied sizes, each carrying its index and a checksum.
                let agent = SharedMemoryTransport::connect(name, "child-streamer", cfg()).await.unwrap();
                println!("HW-READY");
                for i in 0..STREAM_N {
                    let payload = stream_payload(i);
                    let sum = checksum(&payload);
                    let msg =
                        Message::event("child-streamer", "stream", &()).unwrap().with_payload_bytes(payload);
                    agent
                        .send("hub", msg.with_header("i", i.to_string()).with_header("sum", sum.to_string()))
                        .await
                        .unwrap();
                }
                // Leave only once the hub confirms that everything arrived.
                agent.request("hub", "done", &(), WAIT).await.unwrap();
                agent.close().await;
            }
            other => panic!("unknown child role {other}"),
        }
    });
}

const STREAM_N: u64 = 1_000_000;

fn stream_payload(i: u64) -> Bytes {
    let len = (i as usize * 7919) % 256;
    Bytes::from((0..len).map(|k| (k as u64 ^ i) as u8).collect::<Vec<u8>>())
}

fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| (h ^ x as u64).wrapping_mul(0x100_0000_01b3))
}

#[test]
fn cross_process_stream_with_checksums() {
    let name = unique_name();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let hub = rt.block_on(SharedMemoryTransport::listen(&name, "hub", cfg(), small())).unwrap();
    let mut child = spawn_child(&format!("stream:{name}"));
    rt.block_on(async {
        for i in 0..STREAM_N {
            let (from, m) = tokio::time::timeout(WAIT, hub.receive()).await.unwrap().unwrap();
            assert_eq!(from.as_str(), "child-streamer");
            assert_eq!(m.headers.get("i").map(String::as_str), Some(i.to_string().as_str()), "order");
            let sum: u64 = m.headers.get("sum").unwrap().parse().unwrap();
            assert_eq!(checksum(&m.payload), sum, "message {i} corrupted");
            assert_eq!(m.payload, stream_payload(i));
        }
        let (_, done) = tokio::time::timeout(WAIT, hub.receive()).await.unwrap().unwrap();
        assert_eq!(done.method(), Some("done"));
        hub.respond(&done, &()).await.unwrap();
    });
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child exited with {status}");
    rt.block_on(hub.close());
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
}

#[test]
fn cross_process_request_response() {
    let name = unique_name();
    let mut child = spawn_child(&format!("listen:{name}"));
    let child_pid = child.0.id().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let agent = SharedMemoryTransport::connect(&name, "agent", cfg()).await.unwrap();
        assert_eq!(agent.peer_info("child-hub").unwrap().attributes.get("pid"), Some(&child_pid));
        for i in 0..500u64 {
            let payload = Bytes::from(vec![(i % 256) as u8; (i as usize * 37) % 4000]);
            let req = Message::request("agent", "echo", &()).unwrap().with_payload_bytes(payload.clone());
            let resp = agent.request_message("child-hub", req, WAIT).await.unwrap();
            assert_eq!(resp.payload, payload, "round trip {i}");
        }
        let bye = agent.request("child-hub", "exit", &(), WAIT).await.unwrap();
        assert_eq!(bye.payload_as::<String>().unwrap(), "bye");
        agent.close().await;
    });
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child exited with {status}");
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
    assert!(!lock_file(&name).exists());
}

/// A client that speaks the wire protocol itself over `dial_link` receives with `recv_lent`
/// from a hub in another process: every response's payload is lent from the ring (no copy)
/// and equals what was sent.
#[test]
fn a_link_level_client_receives_lent_payloads_from_another_process() {
    use hivewire_core::protocol::handshake::{ClientHandshake, HandshakeConfig};
    use hivewire_core::{LinkRx, LinkTx, ProtocolVersion};

    let name = unique_name();
    let mut child = spawn_child(&format!("listen:{name}"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let hivewire_core::Link { mut tx, mut rx, .. } =
            SharedMemoryTransport::dial_link(&name, &cfg()).await.unwrap();
        // No compression offered: every frame is laid out as the encoder lays it, so lendable.
        let mut hs = ClientHandshake::new(
            HandshakeConfig {
                agent_id: "lender".into(),
                version: ProtocolVersion::CURRENT,
                capabilities: Vec::new(),
                metadata: Default::default(),
                timeout: WAIT,
            },
            std::time::Instant::now(),
        );
        tx.send_batch(&mut vec![hs.hello()]).await.unwrap();
        let ack = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().expect("HelloAck");
        assert_eq!(hs.handle(&ack).unwrap().peer_id.as_str(), "child-hub");
        let mut lent_count = 0;
        for i in 0..300u64 {
            let payload = Bytes::from(vec![(i % 256) as u8; (i as usize * 97) % 6000]);
            let req = Message::request("lender", "echo", &())
                .unwrap()
                .with_payload_bytes(payload.clone())
                .with_destination("child-hub");
            let id = req.id;
            tx.send_batch(&mut vec![req]).await.unwrap();
            loop {
                let lent =
                    tokio::time::timeout(WAIT, rx.recv_lent()).await.unwrap().unwrap().expect("a message");
                // Heartbeats and other control messages pass by.
                if !lent.message().is_response() {
                    continue;
                }
                assert_eq!(lent.message().correlation_id, Some(id), "round trip {i}");
                assert_eq!(lent.payload(), &payload[..], "round trip {i}");
                assert!(lent.is_lent(), "round trip {i}: an uncompressed frame was copied");
                lent_count += 1;
                break;
            }
        }
        assert_eq!(lent_count, 300);
        let exit = Message::request("lender", "exit", &()).unwrap().with_destination("child-hub");
        tx.send_batch(&mut vec![exit]).await.unwrap();
        loop {
            let m = tokio::time::timeout(WAIT, rx.recv()).await.unwrap().unwrap().expect("bye");
            if m.is_response() {
                assert_eq!(m.payload_as::<String>().unwrap(), "bye");
                break;
            }
        }
        tx.close().await;
    });
    let status = child.0.wait().unwrap();
    assert!(status.success(), "child exited with {status}");
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
}

#[test]
fn a_listener_killed_with_sigkill_is_replaced_at_once() {
    let name = unique_name();
    let child = spawn_child(&format!("listen:{name}"));
    assert!(!shm_entries(&name).is_empty(), "the child's control segment exists");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        // The live child owns the name.
        let r = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await;
        assert!(
            matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("address in use")),
            "{r:?}"
        );
    });
    // A connected client notices the listener's death.
    let (agent, mut events) = rt.block_on(async {
        let agent = SharedMemoryTransport::connect(&name, "agent", cfg()).await.unwrap();
        let events = agent.peer_events();
        (agent, events)
    });
    let child_pid = child.0.id();
    let listed = SharedMemoryTransport::endpoints();
    let e = listed.iter().find(|e| e.name == name).expect("the child's endpoint is listed");
    assert!(e.live && e.listener_pid == Some(child_pid), "{e:?}");
    drop(child); // SIGKILL, then reap
    assert_eq!(shm_entries(&name), vec![format!("hw-{name}")], "a dead listener's segment is left behind");
    // Listed as dead: the kernel released its lock, whatever its PID now names.
    let listed = SharedMemoryTransport::endpoints();
    let e = listed.iter().find(|e| e.name == name).expect("the dead endpoint is still listed");
    assert!(!e.live, "{e:?}");
    rt.block_on(async {
        let down = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match events.recv().await {
                    Ok(PeerEvent::Down { agent, .. }) if agent.as_str() == "child-hub" => break,
                    Ok(_) => continue,
                    Err(e) => panic!("events: {e}"),
                }
            }
        })
        .await;
        assert!(down.is_ok(), "the client did not notice the dead listener");
        agent.close().await;
        // A new listener under the same name starts at once and cleans up.
        let hub = SharedMemoryTransport::listen(&name, "hub", cfg(), small()).await.unwrap();
        assert_eq!(shm_entries(&name), vec![format!("hw-{name}")]);
        let a = SharedMemoryTransport::connect(&name, "a", cfg()).await.unwrap();
        spawn_echo(&hub);
        assert_eq!(a.request("hub", "echo", &9u64, WAIT).await.unwrap().payload_as::<u64>().unwrap(), 9);
        a.close().await;
        hub.close().await;
    });
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
}

#[test]
fn a_client_killed_with_sigkill_is_detected_by_the_hub() {
    let name = unique_name();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let hub = rt.block_on(async {
        // A long heartbeat timeout: detection must come from the shm backend itself.
        let cfg = TransportConfig { heartbeat_timeout_ms: 60_000, heartbeat_interval_ms: 10_000, ..cfg() };
        SharedMemoryTransport::listen(&name, "hub", cfg, small()).await.unwrap()
    });
    let mut events = hub.peer_events();
    let mut ticks = rt.block_on(hub.subscribe("tick")).unwrap();
    let child = spawn_child(&format!("connect:{name}"));
    rt.block_on(async {
        // Pub/sub across processes: the child's events reach the hub's subscription, in order.
        let first = tokio::time::timeout(WAIT, ticks.recv()).await.unwrap().unwrap();
        let first = first.payload_as::<u64>().unwrap();
        for k in 1..50 {
            let m = tokio::time::timeout(WAIT, ticks.recv()).await.unwrap().unwrap();
            assert_eq!(m.payload_as::<u64>().unwrap(), first + k);
        }
    });
    drop(child);
    rt.block_on(async {
        let down = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Ok(PeerEvent::Down { agent, .. }) = events.recv().await {
                    if agent.as_str() == "child-agent" {
                        break;
                    }
                }
            }
        })
        .await;
        assert!(down.is_ok(), "the hub did not notice the killed client");
        hub.close().await;
    });
    assert!(shm_entries(&name).is_empty(), "{:?}", shm_entries(&name));
}

#[test]
fn endpoints_are_listed_with_their_owner_while_they_live() {
    let (a, b) = (unique_name(), unique_name());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let hub_a = SharedMemoryTransport::listen(&a, "hub-a", cfg(), small()).await.unwrap();
        let hub_b = SharedMemoryTransport::listen(&b, "hub-b", cfg(), small()).await.unwrap();
        let listed = SharedMemoryTransport::endpoints();
        for name in [&a, &b] {
            let e = listed
                .iter()
                .find(|e| &e.name == name)
                .unwrap_or_else(|| panic!("{name} not listed: {listed:?}"));
            assert!(e.live, "{e:?}");
            assert_eq!(e.listener_pid, Some(std::process::id()));
            assert_eq!(e.ring_capacity, Some(small().ring_capacity()));
        }
        // Listing takes nothing away: the endpoint still accepts.
        let agent = SharedMemoryTransport::connect(&a, "agent", cfg()).await.unwrap();
        assert_eq!(agent.peers()[0].as_str(), "hub-a");
        agent.close().await;
        hub_a.close().await;
        let listed = SharedMemoryTransport::endpoints();
        assert!(!listed.iter().any(|e| e.name == a), "a closed endpoint is still listed: {listed:?}");
        assert!(listed.iter().any(|e| e.name == b && e.live));
        hub_b.close().await;
    });
    assert!(shm_entries(&a).is_empty() && shm_entries(&b).is_empty());
}

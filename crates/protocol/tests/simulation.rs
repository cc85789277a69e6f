//! Deterministic simulation: a client and a server endpoint built from the sans-IO state
//! machines exchange messages over in-memory queues with a fake clock, while the "network"
//! drops, duplicates, delays and reorders them. Checks that requests complete with *their*
//! response or time out at (never before) their deadline, that duplicated responses never match
//! twice, that heartbeats keep a live peer alive, and that a silent peer is declared dead within
//! the configured interval.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hivewire_protocol::{
    AllowAll, ClientHandshake, HandshakeConfig, HeartbeatAction, HeartbeatConfig, HeartbeatTracker, Message,
    MessageType, Metadata, PeerInfo, ProtocolVersion, RequestTracker, ServerHandshake, ServerOutcome,
};

const STEP: Duration = Duration::from_millis(1);
const HB: HeartbeatConfig =
    HeartbeatConfig { interval: Duration::from_millis(100), timeout: Duration::from_millis(1000) };
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);

struct Net {
    rng: fastrand::Rng,
    to_client: Vec<(Instant, Message)>,
    to_server: Vec<(Instant, Message)>,
    faulty: bool,
    server_silent: bool,
}

impl Net {
    fn send(&mut self, to_server: bool, now: Instant, msg: Message) {
        if !to_server && self.server_silent {
            return;
        }
        let copies = if !self.faulty {
            1
        } else if self.rng.u32(0..100) < 10 {
            0 // dropped
        } else if self.rng.u32(0..100) < 10 {
            2 // duplicated
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if self.faulty { self.rng.u64(1..60) } else { 1 };
            let at = now + Duration::from_millis(delay);
            if to_server {
                self.to_server.push((at, msg.clone()));
            } else {
                self.to_client.push((at, msg.clone()));
            }
        }
    }

    fn due(queue: &mut Vec<(Instant, Message)>, now: Instant) -> Vec<Message> {
        // Deliver in arrival-time order; random delays reorder messages.
        queue.sort_by_key(|(t, _)| *t);
        let n = queue.iter().take_while(|(t, _)| *t <= now).count();
        queue.drain(..n).map(|(_, m)| m).collect()
    }
}

fn hs(id: &str) -> HandshakeConfig {
    HandshakeConfig {
        agent_id: id.into(),
        version: ProtocolVersion::CURRENT,
        capabilities: vec!["pubsub".into()],
        metadata: Metadata::new(),
        timeout: Duration::from_secs(5),
    }
}

fn run(seed: u64) {
    let start = Instant::now();
    let mut now = start;
    let mut net = Net {
        rng: fastrand::Rng::with_seed(seed),
        to_client: vec![],
        to_server: vec![],
        faulty: false,
        server_silent: false,
    };

    // Handshake over a clean network.
    let mut client_hs = ClientHandshake::new(hs("client"), now);
    let mut server_hs = ServerHandshake::new(hs("server"), now);
    net.send(true, now, client_hs.hello());
    let mut negotiated = None;
    for _ in 0..10 {
        now += STEP;
        for m in Net::due(&mut net.to_server, now) {
            match server_hs.handle(&m, &PeerInfo::default(), &AllowAll, &|_| false) {
                ServerOutcome::Accept { reply, .. } => net.send(false, now, reply),
                ServerOutcome::Reject { reason, .. } => panic!("rejected: {reason}"),
            }
        }
        for m in Net::due(&mut net.to_client, now) {
            negotiated = Some(client_hs.handle(&m).expect("handshake"));
        }
    }
    assert_eq!(negotiated.expect("handshake finished").peer_id.as_str(), "server");

    // Then the faulty network.
    net.faulty = true;
    let mut client_hb = HeartbeatTracker::new("client".into(), HB, now);
    let mut server_hb = HeartbeatTracker::new("server".into(), HB, now);
    let mut tracker: RequestTracker<u64> = RequestTracker::new(10_000);
    let mut deadlines: HashMap<u64, Instant> = HashMap::new();
    let mut completed: HashMap<u64, Instant> = HashMap::new();
    let mut timed_out: HashMap<u64, Instant> = HashMap::new();
    let mut next_index = 0u64;
    let silence_at = now + Duration::from_secs(10);
    let end = silence_at + Duration::from_secs(3);
    let mut last_client_rx = now;
    let mut dead_at = None;

    while now < end {
        now += STEP;
        if now >= silence_at {
            net.server_silent = true;
        }
        // Server: answer requests (payload index -> index * 3 + 1) and heartbeats.
        for m in Net::due(&mut net.to_server, now) {
            server_hb.on_receive(now);
            match &m.kind {
                MessageType::Heartbeat => {
                    if let Some(reply) = server_hb.on_heartbeat(&m, now) {
                        net.send(false, now, reply);
                    }
                }
                MessageType::Request { .. } => {
                    let idx: u64 = m.payload_as().expect("payload");
                    net.send(false, now, Message::response("server", &m, &(idx * 3 + 1)).expect("encode"));
                }
                other => panic!("server got {other:?}"),
            }
        }
        if let HeartbeatAction::SendProbe(p) = server_hb.poll(now) {
            net.send(false, now, p);
        }
        // Client: match responses.
        for m in Net::due(&mut net.to_client, now) {
            last_client_rx = now;
            match &m.kind {
                MessageType::Heartbeat => {
                    if let Some(reply) = client_hb.on_heartbeat(&m, now) {
                        net.send(true, now, reply);
                    }
                }
                MessageType::Response { .. } => {
                    client_hb.on_receive(now);
                    if let Some(idx) = tracker.on_response(&m) {
                        let got: u64 = m.payload_as().expect("payload");
                        assert_eq!(
                            got,
                            idx * 3 + 1,
                            "seed {seed}: request {idx} matched the response of another"
                        );
                        assert!(
                            !timed_out.contains_key(&idx),
                            "seed {seed}: {idx} completed after timing out"
                        );
                        assert!(completed.insert(idx, now).is_none(), "seed {seed}: {idx} completed twice");
                    }
                }
                other => panic!("client got {other:?}"),
            }
        }
        for (_, idx) in tracker.poll_timeouts(now) {
            let deadline = deadlines[&idx];
            assert!(now >= deadline, "seed {seed}: {idx} timed out before its deadline");
            assert!(now - deadline < STEP * 2, "seed {seed}: {idx} timed out late");
            assert!(!completed.contains_key(&idx), "seed {seed}: {idx} timed out after completing");
            timed_out.insert(idx, now);
        }
        // A request every 5 ms while the server talks.
        if now < silence_at && (now - start).as_millis().is_multiple_of(5) {
            let req = Message::request("client", "triple_plus_one", &next_index).expect("encode");
            tracker.insert(req.id, "server".into(), now + REQUEST_TIMEOUT, next_index).expect("insert");
            deadlines.insert(next_index, now + REQUEST_TIMEOUT);
            next_index += 1;
            net.send(true, now, req);
        }
        match client_hb.poll(now) {
            HeartbeatAction::SendProbe(p) => net.send(true, now, p),
            HeartbeatAction::PeerDead { .. } => {
                assert!(now >= silence_at, "seed {seed}: a live peer was declared dead at {:?}", now - start);
                dead_at.get_or_insert(now);
            }
            HeartbeatAction::Idle => {}
        }
    }

    // Every request ended exactly one way.
    for idx in 0..next_index {
        assert!(
            completed.contains_key(&idx) ^ timed_out.contains_key(&idx),
            "seed {seed}: request {idx} neither completed nor timed out (or both)"
        );
    }
    assert!(completed.len() as u64 > next_index / 2, "seed {seed}: too few completions to mean anything");
    assert!(!timed_out.is_empty(), "seed {seed}: the lossy network should have cost some requests");
    assert!(client_hb.rtt().is_some(), "seed {seed}: no RTT measured");
    // The silent server is declared dead between `timeout` and `timeout + interval` after the
    // client last heard from it.
    let dead_at = dead_at.unwrap_or_else(|| panic!("seed {seed}: silent peer never declared dead"));
    let silent = dead_at - last_client_rx;
    assert!(silent >= HB.timeout, "seed {seed}: declared dead after only {silent:?}");
    assert!(silent <= HB.timeout + HB.interval, "seed {seed}: declared dead late, after {silent:?}");
}

#[test]
fn lossy_network_simulation_over_many_seeds() {
    for seed in [1, 2, 3, 42, 1234, 99_999] {
        run(seed);
    }
}

//! The scenarios. Each returns `Ok(())` on pass or `Err(why)`; a scenario whose required
//! capability the backend declares absent is skipped by the runner before it starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hivewire_core::protocol::{error_codes, ControlOperation, RejectReason};
use hivewire_core::{
    AgentId, Backpressure, Compression, HelloInfo, Message, MessageType, Node, PeerEvent, PeerInfo,
    ProtocolVersion, TransportConfig, TransportError,
};
use serde_json::json;
use tokio::sync::broadcast;

use crate::{BackendFactory, BoxFuture, Capabilities, Outcome, RawPeer};

type R = Result<(), String>;
type Run = fn(Arc<dyn BackendFactory>) -> BoxFuture<'static, R>;
type Requires = fn(&Capabilities) -> Option<&'static str>;

/// One scenario: its name, the capability it needs, and its body.
pub(crate) struct Entry {
    pub name: &'static str,
    pub requires: Requires,
    pub run: Run,
}

fn always(_: &Capabilities) -> Option<&'static str> {
    None
}
fn ordered(c: &Capabilities) -> Option<&'static str> {
    (!c.ordered).then_some("backend declares ordered delivery absent")
}
fn reliable(c: &Capabilities) -> Option<&'static str> {
    (!c.reliable).then_some("backend declares reliable delivery absent")
}
fn redials(c: &Capabilities) -> Option<&'static str> {
    (!c.redials).then_some("backend declares that dialing nodes do not redial")
}
/// The queued messages must all arrive after the reconnect, in order.
fn redials_reliably(c: &Capabilities) -> Option<&'static str> {
    redials(c).or_else(|| reliable(c)).or_else(|| ordered(c))
}
fn bytes_path(c: &Capabilities) -> Option<&'static str> {
    (!c.carries_bytes)
        .then_some("backend declares it carries Message values, not bytes: compression never applies")
}

macro_rules! entry {
    ($name:literal, $req:expr, $f:path) => {
        Entry { name: $name, requires: $req, run: |b| Box::pin($f(b)) }
    };
}

pub(crate) const ALL: &[Entry] = &[
    entry!("handshake", always, handshake),
    entry!("version_mismatch", always, version_mismatch),
    entry!("auth_rejection", always, auth_rejection),
    entry!("malformed_handshake", always, malformed_handshake),
    entry!("handshake_timeout", always, handshake_timeout),
    entry!("send_receive", always, send_receive),
    entry!("fifo_10k", ordered, fifo_10k),
    entry!("request_response", always, request_response),
    entry!("concurrent_requests_1000", reliable, concurrent_requests),
    entry!("request_timeout", always, request_timeout),
    entry!("pubsub_wildcards", always, pubsub_wildcards),
    entry!("broadcast_exactly_once", reliable, broadcast_exactly_once),
    entry!("hub_routing", always, hub_routing),
    entry!("hub_100_clients", reliable, hub_100_clients),
    entry!("ttl_expiry", always, ttl_expiry),
    entry!("max_message_size", always, max_message_size),
    entry!("message_sizes", reliable, message_sizes),
    entry!("compression_negotiation", always, compression_negotiation),
    entry!("compression_gzip", bytes_path, compression_gzip),
    entry!("compression_zstd", bytes_path, compression_zstd),
    entry!("queue_full_backpressure", reliable, queue_full),
    entry!("max_peers", always, max_peers),
    entry!("max_pending_requests", always, max_pending_requests),
    entry!("subscription_limit", always, subscription_limit),
    entry!("heartbeat_dead_peer", always, heartbeat_dead_peer),
    entry!("clean_close", always, clean_close),
    entry!("reconnect_restores_queue_and_subscriptions", redials_reliably, reconnect),
    entry!("reconnect_gives_up", redials, reconnect_gives_up),
];

impl Entry {
    pub(crate) async fn run(&self, backend: Arc<dyn BackendFactory>) -> Outcome {
        if let Some(reason) = (self.requires)(&backend.capabilities()) {
            return Outcome::Skip(reason.to_string());
        }
        match (self.run)(backend).await {
            Ok(()) => Outcome::Pass,
            Err(why) => Outcome::Fail(why),
        }
    }
}

// ----- helpers --------------------------------------------------------------------------------

const WAIT: Duration = Duration::from_secs(10);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// A heartbeat round trip over a raw link: the hub has read everything sent before it. The
/// probe is sent again every 500 ms within [`WAIT`] (an unreliable backend may lose one).
async fn raw_round_trip(raw: &mut dyn RawPeer, agent: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let probe = Message::heartbeat(agent);
        raw.send(probe.clone()).await.ctx("probe")?;
        let again = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
        loop {
            match tokio::time::timeout_at(again, raw.recv()).await {
                Ok(Ok(Some(m))) if m.correlation_id == Some(probe.id) => return Ok(()),
                Ok(Ok(Some(_))) => continue,
                Ok(other) => return Err(format!("{other:?}")),
                Err(_) if again < deadline => break,
                Err(_) => return Err(format!("no heartbeat reply within {WAIT:?}")),
            }
        }
    }
}

/// Nodes a scenario opened, closed at the end whatever the outcome.
struct Env {
    b: Arc<dyn BackendFactory>,
    nodes: Vec<Node>,
}

impl Env {
    fn new(b: Arc<dyn BackendFactory>) -> Self {
        Env { b, nodes: Vec::new() }
    }

    async fn hub(&mut self, id: &str, cfg: TransportConfig) -> Result<(Node, String), String> {
        let (n, addr) = self.b.listen(id, cfg).await.ctx("listen")?;
        self.nodes.push(n.clone());
        Ok((n, addr))
    }

    async fn client(&mut self, addr: &str, id: &str, cfg: TransportConfig) -> Result<Node, String> {
        let n = self.b.connect(addr, id, cfg).await.ctx(&format!("connect {id}"))?;
        self.nodes.push(n.clone());
        Ok(n)
    }

    async fn star(&mut self, n: usize, cfg: TransportConfig) -> Result<(Node, String, Vec<Node>), String> {
        let (hub, addr) = self.hub("hub", cfg.clone()).await?;
        let mut clients = Vec::new();
        for i in 0..n {
            clients.push(self.client(&addr, &format!("c{i}"), cfg.clone()).await?);
        }
        Ok((hub, addr, clients))
    }

    async fn finish(self, r: R) -> R {
        for n in self.nodes {
            n.close().await;
        }
        r
    }
}

/// The counters of `nodes`, for a failure message: where a lost message went missing.
fn diagnosis(nodes: &[&Node]) -> String {
    let mut out = Vec::new();
    for n in nodes {
        let s = n.stats();
        let peers: Vec<String> = s
            .peers
            .iter()
            .map(|p| {
                format!(
                    "{}: sent {} recv {} queued {}",
                    p.agent, p.messages_sent, p.messages_received, p.queued
                )
            })
            .collect();
        out.push(format!(
            "{} [sent {} recv {} errors {} unmatched {} unroutable {} peers {{{}}}]",
            n.agent_id(),
            s.messages_sent,
            s.messages_received,
            s.errors,
            s.dropped_unmatched,
            s.dropped_unroutable,
            peers.join(", ")
        ));
    }
    out.join("; ")
}

async fn recv(node: &Node) -> Result<(AgentId, Message), String> {
    match tokio::time::timeout(WAIT, node.receive()).await {
        Ok(r) => r.ctx(&format!("{} receive", node.agent_id())),
        Err(_) => Err(format!("{} received nothing within {WAIT:?}", node.agent_id())),
    }
}

async fn next_event(
    rx: &mut broadcast::Receiver<PeerEvent>,
    mut want: impl FnMut(&PeerEvent) -> bool,
) -> Result<PeerEvent, String> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(ev)) if want(&ev) => return Ok(ev),
            Ok(Ok(_)) => continue,
            Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(e)) => return Err(format!("peer events ended: {e}")),
            Err(_) => return Err(format!("expected peer event did not come within {WAIT:?}")),
        }
    }
}

fn event(topic: &str, value: u64) -> Message {
    Message::event("x", topic, &value).expect("u64 encodes")
}

fn num(m: &Message) -> Result<u64, String> {
    m.payload_as::<u64>().ctx("payload")
}

fn raw_payload(len: usize, seed: u8) -> Bytes {
    Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<u8>>())
}

/// A hub that answers `echo` with the request's payload and `fail` with error 1001.
fn spawn_echo(node: &Node) {
    let n = node.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = n.receive().await {
            if !req.is_request() {
                continue;
            }
            let _ = match req.method() {
                Some("echo") => n.respond_bytes(&req, req.payload.clone()).await,
                Some("fail") => n.respond_error(&req, 1001, "asked to fail").await,
                _ => n.respond_error(&req, error_codes::UNKNOWN_METHOD, "no such method").await,
            };
        }
    });
}

fn small_cfg() -> TransportConfig {
    TransportConfig { connection_timeout_ms: 5_000, ..TransportConfig::default() }
}

// ----- scenarios ------------------------------------------------------------------------------

async fn handshake(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let mut ev = hub.peer_events();
        let c = env.client(&addr, "c1", small_cfg()).await?;
        ensure!(c.peers() == vec![AgentId::from("hub")], "client peers {:?}", c.peers());
        next_event(&mut ev, |e| matches!(e, PeerEvent::Up { agent, .. } if agent == "c1")).await?;
        ensure!(hub.peers().contains(&AgentId::from("c1")), "hub peers {:?}", hub.peers());
        let n = c.negotiated("hub").ok_or("no negotiation recorded")?;
        ensure!(n.version == ProtocolVersion::CURRENT, "negotiated {}", n.version);
        ensure!(n.has("pubsub"), "capabilities {:?}", n.capabilities);
        let dup = env.b.connect(&addr, "c1", small_cfg()).await;
        ensure!(
            matches!(dup, Err(TransportError::Rejected(RejectReason::DuplicateAgentId(_)))),
            "a second c1 must be rejected as a duplicate, got {dup:?}"
        );
        ensure!(c.peers().len() == 1, "the first c1 must stay connected");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn version_mismatch(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let mut ev = hub.peer_events();
        let future = ProtocolVersion::new(ProtocolVersion::CURRENT.major + 1, 0);
        let cfg = TransportConfig { protocol_version: future, ..small_cfg() };
        let r = env.b.connect(&addr, "time-traveller", cfg).await;
        match r {
            Err(TransportError::ProtocolMismatch { ours, theirs }) => {
                ensure!(ours == future && theirs == ProtocolVersion::CURRENT, "ours {ours} theirs {theirs}");
            }
            other => return Err(format!("expected ProtocolMismatch on the client, got {other:?}")),
        }
        let e = next_event(&mut ev, |e| matches!(e, PeerEvent::Rejected { .. })).await?;
        ensure!(
            matches!(e, PeerEvent::Rejected { reason: RejectReason::VersionMismatch { .. }, .. }),
            "hub must report the mismatch, got {e:?}"
        );
        // A newer minor of the same major is compatible: the lower minor is spoken.
        let newer = ProtocolVersion::new(ProtocolVersion::CURRENT.major, ProtocolVersion::CURRENT.minor + 3);
        let c =
            env.client(&addr, "newer", TransportConfig { protocol_version: newer, ..small_cfg() }).await?;
        let n = c.negotiated("hub").ok_or("no negotiation")?;
        ensure!(n.version == ProtocolVersion::CURRENT, "expected the lower minor, got {}", n.version);
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn auth_rejection(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let cfg = small_cfg().with_authenticator(|hello: &HelloInfo<'_>, _peer: &PeerInfo| {
            match hello.metadata.get("token").map(String::as_str) {
                Some("s3cret") => Ok(()),
                _ => Err("missing or wrong token".to_string()),
            }
        });
        let (hub, addr) = env.hub("hub", cfg).await?;
        let mut ev = hub.peer_events();
        let r = env.b.connect(&addr, "intruder", small_cfg()).await;
        ensure!(
            matches!(r, Err(TransportError::Rejected(RejectReason::Unauthorized(ref why))) if why.contains("token")),
            "expected Unauthorized, got {r:?}"
        );
        next_event(&mut ev, |e| {
            matches!(e, PeerEvent::Rejected { agent, reason: RejectReason::Unauthorized(_) } if agent == "intruder")
        })
        .await?;
        let mut good = small_cfg();
        good.metadata.insert("token".into(), "s3cret".into());
        let c = env.client(&addr, "friend", good).await?;
        ensure!(c.peers().len() == 1, "friend must be admitted");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn malformed_handshake(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let good = env.client(&addr, "good", small_cfg()).await?;
        let mut raw = env.b.raw_connect(&addr).await.ctx("raw connect")?;
        raw.send(event("not.a.hello", 1)).await.ctx("raw send")?;
        let reply =
            tokio::time::timeout(WAIT, raw.recv()).await.map_err(|_| "no reply to a bad first message")?;
        match reply.ctx("raw recv")? {
            Some(m) => ensure!(
                matches!(
                    m.kind,
                    MessageType::Control(ControlOperation::Reject { reason: RejectReason::Malformed(_) })
                ),
                "expected Reject(Malformed), got {:?}",
                m.kind
            ),
            None => return Err("link closed without a Reject".into()),
        }
        // The listener keeps serving its other peers.
        good.send("hub", event("still.here", 7)).await.ctx("send after bad peer")?;
        let (_, m) = recv(&hub).await?;
        ensure!(num(&m)? == 7, "wrong message");
        ensure!(hub.stats().handshake_failures >= 1, "handshake failure not counted");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn handshake_timeout(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let cfg = TransportConfig { connection_timeout_ms: 300, ..TransportConfig::default() };
        let (hub, addr) = env.hub("hub", cfg).await?;
        let mut raw = env.b.raw_connect(&addr).await.ctx("raw connect")?;
        let start = Instant::now();
        let r = tokio::time::timeout(WAIT, raw.recv()).await.map_err(|_| "a silent peer was never closed")?;
        ensure!(matches!(r, Ok(None) | Err(_)), "expected the link to close, got {r:?}");
        ensure!(start.elapsed() >= Duration::from_millis(250), "closed before the handshake timeout");
        ensure!(hub.stats().handshake_failures >= 1, "handshake timeout not counted");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn send_receive(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let c = env.client(&addr, "c", small_cfg()).await?;
        let v = json!({"n": 42, "name": "fib", "list": [1, 2, 3]});
        let m =
            Message::event("c", "greeting", &v).ctx("encode")?.with_header("trace", "t-1").with_priority(200);
        c.send("hub", m).await.ctx("client send")?;
        let (from, got) = recv(&hub).await?;
        ensure!(from == "c" && got.source == "c", "from {from} source {}", got.source);
        ensure!(got.payload_as::<serde_json::Value>().ctx("decode")? == v, "payload changed");
        ensure!(got.headers.get("trace").map(String::as_str) == Some("t-1"), "header lost");
        ensure!(got.priority == 200, "priority lost");
        ensure!(got.timestamp_ms > 0, "timestamp not stamped");
        hub.send("c", event("reply", 9)).await.ctx("hub send")?;
        let (from, got) = recv(&c).await?;
        ensure!(from == "hub" && num(&got)? == 9, "wrong reply");
        let unknown = c.send("nobody", event("x", 1)).await;
        ensure!(unknown.is_ok(), "sending to an unknown agent through a hub is accepted (and dropped there)");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn fifo_10k(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        const N: u64 = 10_000;
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let c = env.client(&addr, "c", small_cfg()).await?;
        let (c2, hub2) = (c.clone(), hub.clone());
        let up = tokio::spawn(async move {
            for i in 0..N {
                c2.send("hub", event("seq", i)).await?;
            }
            Ok::<_, TransportError>(())
        });
        let down = tokio::spawn(async move {
            for i in 0..N {
                hub2.send("c", event("seq", i)).await?;
            }
            Ok::<_, TransportError>(())
        });
        for i in 0..N {
            let (_, m) = recv(&hub).await?;
            ensure!(num(&m)? == i, "hub got {} where {i} was due", num(&m)?);
        }
        for i in 0..N {
            let (_, m) = recv(&c).await?;
            ensure!(num(&m)? == i, "client got {} where {i} was due", num(&m)?);
        }
        up.await.ctx("join")?.ctx("send up")?;
        down.await.ctx("join")?.ctx("send down")?;
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn request_response(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        spawn_echo(&hub);
        let c = env.client(&addr, "c", small_cfg()).await?;
        let v = json!({"question": "life", "n": 42});
        let resp = c.request("hub", "echo", &v, WAIT).await.ctx("echo")?;
        ensure!(resp.is_response(), "not a response: {:?}", resp.kind);
        ensure!(resp.source == "hub", "response from {}", resp.source);
        ensure!(resp.payload_as::<serde_json::Value>().ctx("decode")? == v, "payload changed");
        let failed = c.request("hub", "fail", &(), WAIT).await;
        ensure!(
            matches!(failed, Err(TransportError::RequestFailed { code: 1001, .. })),
            "expected RequestFailed 1001, got {failed:?}"
        );
        let unroutable = c.request("nobody", "echo", &(), WAIT).await;
        ensure!(
            matches!(unroutable, Err(TransportError::RequestFailed { code: error_codes::UNROUTABLE, .. })),
            "a request to an unknown agent must fail fast with UNROUTABLE, got {unroutable:?}"
        );
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn concurrent_requests(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        spawn_echo(&hub);
        let c = env.client(&addr, "c", small_cfg()).await?;
        let calls = (0..1000u64).map(|i| {
            let c = c.clone();
            async move {
                let resp = c.request("hub", "echo", &i, Duration::from_secs(30)).await?;
                Ok::<_, TransportError>((i, resp.payload_as::<u64>()?))
            }
        });
        let results = futures::future::join_all(calls).await;
        for r in results {
            let (i, got) = r.ctx("request")?;
            ensure!(i == got, "request {i} got the response of {got}");
        }
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn request_timeout(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let c = env.client(&addr, "c", small_cfg()).await?;
        let start = Instant::now();
        let r = c.request("hub", "never", &1u64, Duration::from_millis(200)).await;
        ensure!(matches!(r, Err(TransportError::Timeout)), "expected Timeout, got {r:?}");
        ensure!(start.elapsed() >= Duration::from_millis(190), "timed out early: {:?}", start.elapsed());
        // The hub got the request; its late answer is dropped, not matched to anything else.
        let (_, req) = recv(&hub).await?;
        hub.respond(&req, &999u64).await.ctx("late respond")?;
        spawn_echo(&hub);
        let resp = c.request("hub", "echo", &5u64, WAIT).await.ctx("request after timeout")?;
        ensure!(num(&resp)? == 5, "got {} instead of 5", num(&resp)?);
        ensure!(c.stats().dropped_unmatched >= 1, "the late response was not counted as unmatched");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn pubsub_wildcards(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, _addr, cs) = env.star(2, small_cfg()).await?;
        let (publisher, subscriber) = (&cs[0], &cs[1]);
        let mut temps = subscriber.subscribe("sensors.*.temp").await.ctx("subscribe")?;
        let mut logs = subscriber.subscribe("logs.**").await.ctx("subscribe")?;
        publisher.barrier(WAIT).await.ctx("barrier")?;
        let topics = [
            ("sensors.arm.temp", true, false),
            ("sensors.arm.left.temp", false, false),
            ("sensors.arm.pressure", false, false),
            ("logs.app", false, true),
            ("logs.app.db", false, true),
            ("logs", false, false),
            ("other.topic", false, false),
        ];
        for (i, (t, _, _)) in topics.iter().enumerate() {
            publisher.publish(t, &(i as u64)).await.ctx("publish")?;
        }
        publisher.publish("logs.end", &100u64).await.ctx("publish")?;
        let want_logs: Vec<u64> =
            topics.iter().enumerate().filter(|(_, t)| t.2).map(|(i, _)| i as u64).chain([100]).collect();
        for want in want_logs {
            let m = tokio::time::timeout(WAIT, logs.recv())
                .await
                .map_err(|_| {
                    format!("logs.** missed event {want}; {}", diagnosis(&[&hub, publisher, subscriber]))
                })?
                .ok_or("closed")?;
            ensure!(num(&m)? == want, "logs.** got {} ({:?}) where {want} was due", num(&m)?, m.topic());
        }
        let m = temps.try_recv().ok_or("sensors.*.temp missed sensors.arm.temp")?;
        ensure!(num(&m)? == 0, "sensors.*.temp got {:?}", m.topic());
        ensure!(temps.try_recv().is_none(), "sensors.*.temp got a non-matching event");
        ensure!(
            hub.stats().dropped_unmatched == 0,
            "non-matching events crossed the link to the hub ({} dropped there)",
            hub.stats().dropped_unmatched
        );
        // Unsubscribing stops the flow at the source.
        drop(temps);
        subscriber.barrier(WAIT).await.ctx("barrier")?;
        publisher.barrier(WAIT).await.ctx("barrier")?;
        publisher.publish("sensors.arm.temp", &1u64).await.ctx("publish")?;
        publisher.publish("logs.end", &101u64).await.ctx("publish")?;
        let m =
            tokio::time::timeout(WAIT, logs.recv()).await.map_err(|_| "sentinel lost")?.ok_or("closed")?;
        ensure!(num(&m)? == 101, "unexpected {:?}", m.topic());
        ensure!(subscriber.try_receive().is_none(), "an unsubscribed event leaked into receive()");
        ensure!(publisher.stats().errors == 0, "publisher counted errors");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn broadcast_exactly_once(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, _addr, cs) = env.star(4, small_cfg()).await?;
        let first = Message::broadcast("c0", "all", &1u64).ctx("encode")?;
        let second = Message::broadcast("c0", "all", &2u64).ctx("encode")?;
        cs[0].broadcast(first).await.ctx("broadcast")?;
        cs[0].broadcast(second).await.ctx("broadcast")?;
        let mut receivers: Vec<&Node> = cs[1..].iter().collect();
        receivers.push(&hub);
        for node in &receivers {
            for want in [1u64, 2] {
                let (from, m) = recv(node).await?;
                ensure!(from == "c0", "{} got a broadcast from {from}", node.agent_id());
                ensure!(
                    num(&m)? == want,
                    "{} got {} where {want} was due (duplicate?)",
                    node.agent_id(),
                    num(&m)?
                );
            }
        }
        // The sender does not get its own broadcast back: the next thing it sees is the hub's.
        hub.broadcast(Message::broadcast("hub", "all", &3u64).ctx("encode")?).await.ctx("hub broadcast")?;
        let (from, m) = recv(&cs[0]).await?;
        ensure!(from == "hub" && num(&m)? == 3, "c0 got its own broadcast back ({from}, {})", num(&m)?);
        let not_bcast = cs[0].broadcast(event("x", 1)).await;
        ensure!(
            matches!(not_bcast, Err(TransportError::InvalidMessage(_))),
            "broadcast of an event must be refused"
        );
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn hub_routing(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (_hub, _addr, cs) = env.star(2, small_cfg()).await?;
        let (a, bb) = (&cs[0], &cs[1]);
        a.send("c1", event("direct", 11)).await.ctx("send via hub")?;
        let (from, m) = recv(bb).await?;
        ensure!(
            from == "c0" && m.destination.as_deref() == Some("c1"),
            "from {from} dest {:?}",
            m.destination
        );
        ensure!(num(&m)? == 11, "payload changed");
        ensure!(
            m.ttl == hivewire_core::protocol::DEFAULT_TTL - 1,
            "the hub must decrement the TTL (got {})",
            m.ttl
        );
        spawn_echo(bb);
        let resp = a.request("c1", "echo", &12u64, WAIT).await.ctx("request via hub")?;
        ensure!(resp.source == "c1" && num(&resp)? == 12, "wrong response");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn ttl_expiry(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, _addr, cs) = env.star(2, small_cfg()).await?;
        let (a, bb) = (&cs[0], &cs[1]);
        a.send("c1", event("hop", 1).with_ttl(1)).await.ctx("send")?;
        a.send("c1", event("hop", 2).with_ttl(2)).await.ctx("send")?;
        let (_, m) = recv(bb).await?;
        ensure!(num(&m)? == 2, "a ttl=1 message was relayed");
        ensure!(hub.stats().dropped_ttl >= 1, "the hub did not count the expired message");
        let req = Message::request("c0", "echo", &()).ctx("encode")?.with_ttl(1);
        let r = a.request_message("c1", req, WAIT).await;
        ensure!(
            matches!(r, Err(TransportError::RequestFailed { code: error_codes::TTL_EXPIRED, .. })),
            "expected TTL_EXPIRED, got {r:?}"
        );
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn max_message_size(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        const MAX: usize = 256 * 1024;
        let cfg = TransportConfig { max_message_size: MAX, ..small_cfg() };
        let (hub, addr) = env.hub("hub", cfg.clone()).await?;
        let c = env.client(&addr, "c", cfg).await?;
        let at = Message::new("c", MessageType::Event { topic: "big".into() })
            .with_payload_bytes(raw_payload(MAX, 1));
        c.send("hub", at.clone()).await.ctx("exactly max")?;
        let over = at.clone().with_payload_bytes(raw_payload(MAX + 1, 2));
        let r = c.send("hub", over).await;
        ensure!(
            matches!(r, Err(TransportError::MessageTooLarge { size, max }) if size == MAX + 1 && max == MAX),
            "expected MessageTooLarge {{ size: {}, max: {MAX} }}, got {r:?}",
            MAX + 1
        );
        c.send("hub", event("after", 3)).await.ctx("send after too large")?;
        let (_, m) = recv(&hub).await?;
        ensure!(m.payload == at.payload, "the max-size payload changed");
        let (_, m) = recv(&hub).await?;
        ensure!(num(&m)? == 3, "the link is not usable after MessageTooLarge");
        let big = hub.send("c", at.clone().with_payload_bytes(raw_payload(MAX + 1, 3))).await;
        ensure!(
            matches!(big, Err(TransportError::MessageTooLarge { .. })),
            "hub side must refuse too: {big:?}"
        );
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn message_sizes(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        const MAX: usize = 2 * 1024 * 1024;
        let cfg = TransportConfig { max_message_size: MAX, ..small_cfg() };
        let (hub, addr) = env.hub("hub", cfg.clone()).await?;
        spawn_echo(&hub);
        let c = env.client(&addr, "c", cfg).await?;
        for (i, size) in [0, 1, 65_535, 65_536, 65_537, 1 << 20, MAX - 1, MAX].into_iter().enumerate() {
            let payload = raw_payload(size, i as u8);
            let req = Message::new("c", MessageType::Request { method: "echo".into() })
                .with_payload_bytes(payload.clone());
            let resp = c.request_message("hub", req, WAIT).await.ctx(&format!("echo of {size} bytes"))?;
            ensure!(resp.payload == payload, "{size} bytes came back different");
        }
        let req = Message::new("c", MessageType::Request { method: "echo".into() })
            .with_payload_bytes(raw_payload(MAX + 1, 0));
        let r = c.request_message("hub", req, WAIT).await;
        ensure!(matches!(r, Err(TransportError::MessageTooLarge { .. })), "max+1 must be refused, got {r:?}");
        Ok(())
    }
    .await;
    env.finish(r).await
}

fn compressing(codecs: Vec<Compression>) -> TransportConfig {
    TransportConfig {
        enable_compression: true,
        compression_codecs: codecs,
        compression_threshold: 1024,
        ..small_cfg()
    }
}

async fn compression_negotiation(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (_hub, addr) = env.hub("hub", compressing(vec![Compression::Zstd, Compression::Gzip])).await?;
        let both = env.client(&addr, "both", compressing(vec![Compression::Zstd, Compression::Gzip])).await?;
        let n = both.negotiated("hub").ok_or("no negotiation")?;
        ensure!(
            n.has("compression.zstd") && n.has("compression.gzip"),
            "both offered both: {:?}",
            n.capabilities
        );
        let gz = env.client(&addr, "gz", compressing(vec![Compression::Gzip])).await?;
        let n = gz.negotiated("hub").ok_or("no negotiation")?;
        ensure!(n.has("compression.gzip") && !n.has("compression.zstd"), "gzip only: {:?}", n.capabilities);
        let none = env.client(&addr, "none", small_cfg()).await?;
        let n = none.negotiated("hub").ok_or("no negotiation")?;
        ensure!(
            !n.has("compression.gzip") && !n.has("compression.zstd"),
            "none offered: {:?}",
            n.capabilities
        );
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn compression_round_trip(b: Arc<dyn BackendFactory>, codec: Compression) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", compressing(vec![Compression::Zstd, Compression::Gzip])).await?;
        spawn_echo(&hub);
        let c = env.client(&addr, "c", compressing(vec![codec])).await?;
        let text = "the quick brown fox jumps over the lazy dog. ".repeat(5000);
        for payload in [text.clone(), text[..1000].to_string(), String::new()] {
            let resp = c.request("hub", "echo", &payload, WAIT).await.ctx("echo")?;
            ensure!(
                resp.payload_as::<String>().ctx("decode")? == payload,
                "{} bytes changed in transit",
                payload.len()
            );
        }
        // A peer that negotiated nothing still talks to a compressing hub.
        let plain = env.client(&addr, "plain", small_cfg()).await?;
        let resp = plain.request("hub", "echo", &text, WAIT).await.ctx("plain echo")?;
        ensure!(resp.payload_as::<String>().ctx("decode")? == text, "plain peer got a different payload");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn compression_gzip(b: Arc<dyn BackendFactory>) -> R {
    compression_round_trip(b, Compression::Gzip).await
}

async fn compression_zstd(b: Arc<dyn BackendFactory>) -> R {
    compression_round_trip(b, Compression::Zstd).await
}

async fn queue_full(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let hub_cfg = TransportConfig { inbound_queue_capacity: 8, ..small_cfg() };
        let (hub, addr) = env.hub("hub", hub_cfg).await?;
        let cfg =
            TransportConfig { outbound_queue_capacity: 8, backpressure: Backpressure::Error, ..small_cfg() };
        let c = env.client(&addr, "c", cfg).await?;
        // Nobody reads at the hub: queues fill up to their bounds and then the sender is told.
        let mut accepted = 0u64;
        let mut full = None;
        for i in 0..200_000u64 {
            match c.send("hub", event("fill", i)).await {
                Ok(()) => accepted += 1,
                Err(e) => {
                    full = Some(e);
                    break;
                }
            }
            if i % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        match full {
            Some(TransportError::QueueFull { capacity: 8 }) => {}
            other => {
                return Err(format!("expected QueueFull {{ capacity: 8 }}, got {other:?} after {accepted}"))
            }
        }
        // Everything accepted is delivered, in order.
        for i in 0..accepted {
            let (_, m) = recv(&hub).await?;
            ensure!(num(&m)? == i, "got {} where {i} was due", num(&m)?);
        }
        c.send("hub", event("after", accepted)).await.ctx("send after draining")?;
        let (_, m) = recv(&hub).await?;
        ensure!(num(&m)? == accepted, "link unusable after QueueFull");
        // With the Wait policy the sender waits instead.
        let wcfg =
            TransportConfig { outbound_queue_capacity: 8, backpressure: Backpressure::Wait, ..small_cfg() };
        let w = env.client(&addr, "w", wcfg).await?;
        let w2 = w.clone();
        let sender = tokio::spawn(async move {
            for i in 0..50_000u64 {
                w2.send("hub", event("wait", i)).await?;
            }
            Ok::<_, TransportError>(())
        });
        for i in 0..50_000u64 {
            let (_, m) = recv(&hub).await?;
            ensure!(num(&m)? == i, "waiting sender: got {} where {i} was due", num(&m)?);
        }
        sender.await.ctx("join")?.ctx("waiting sender")?;
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn heartbeat_dead_peer(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let cfg = TransportConfig { heartbeat_interval_ms: 100, heartbeat_timeout_ms: 600, ..small_cfg() };
        let (hub, addr) = env.hub("hub", cfg.clone()).await?;
        let mut ev = hub.peer_events();
        let alive = env.client(&addr, "alive", cfg.clone()).await?;
        let mut raw = env.b.raw_connect(&addr).await.ctx("raw connect")?;
        let hello = Message::control(
            "silent",
            ControlOperation::Hello {
                version: ProtocolVersion::CURRENT,
                capabilities: vec![],
                metadata: Default::default(),
            },
        );
        raw.send(hello).await.ctx("hello")?;
        let ack = tokio::time::timeout(WAIT, raw.recv()).await.map_err(|_| "no HelloAck")?.ctx("recv")?;
        ensure!(
            matches!(
                ack.as_ref().map(|m| &m.kind),
                Some(MessageType::Control(ControlOperation::HelloAck { .. }))
            ),
            "expected HelloAck, got {ack:?}"
        );
        let since = Instant::now();
        // Now the raw peer says nothing at all (and reads nothing).
        let down =
            next_event(&mut ev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "silent")).await?;
        let took = since.elapsed();
        ensure!(
            took >= Duration::from_millis(550),
            "declared dead after {took:?}, before the 600 ms timeout"
        );
        ensure!(took <= Duration::from_millis(600 + 100 + 2000), "declared dead only after {took:?}");
        ensure!(
            matches!(&down, PeerEvent::Down { reason, .. } if reason.contains("heartbeat")),
            "reason: {down:?}"
        );
        // A live peer, whose heartbeats flow, is not declared dead.
        ensure!(hub.peers().contains(&AgentId::from("alive")), "the live peer was dropped");
        ensure!(alive.peers().len() == 1, "the live peer lost the hub");
        let rtt = alive.stats().peers.first().and_then(|p| p.rtt);
        ensure!(rtt.is_some(), "no heartbeat round trip measured");
        drop(raw);
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn clean_close(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let mut ev = hub.peer_events();
        let a = env.client(&addr, "a", small_cfg()).await?;
        // The hub is gone for good when b redials: a short connection timeout (a datagram
        // backend's dial to a closed port is not refused, it times out).
        let quick_giveup = TransportConfig {
            retry_attempts: 2,
            reconnect_base_delay_ms: 20,
            connection_timeout_ms: 1_000,
            ..small_cfg()
        };
        let bb = env.client(&addr, "b", quick_giveup).await?;
        let mut bev = bb.peer_events();
        for i in 0..100 {
            a.send("hub", event("before.close", i)).await.ctx("send")?;
        }
        a.close().await;
        for i in 0..100 {
            let (_, m) = recv(&hub).await?;
            ensure!(num(&m)? == i, "message {i} sent before close was lost");
        }
        let down =
            next_event(&mut ev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "a")).await?;
        ensure!(
            matches!(&down, PeerEvent::Down { reason, .. } if reason.contains("goodbye")),
            "reason: {down:?}"
        );
        ensure!(!hub.peers().contains(&AgentId::from("a")), "a still listed");
        ensure!(
            matches!(a.send("hub", event("x", 1)).await, Err(TransportError::Closed)),
            "send after close"
        );
        ensure!(matches!(a.receive().await, Err(TransportError::Closed)), "receive after close");
        let r = hub.send("a", event("x", 1)).await;
        ensure!(matches!(r, Err(TransportError::UnknownAgent(_))), "hub send to a closed peer: {r:?}");
        hub.close().await;
        let down =
            next_event(&mut bev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "hub")).await?;
        ensure!(
            matches!(&down, PeerEvent::Down { reason, .. } if reason.contains("goodbye")),
            "reason: {down:?}"
        );
        // A dialing node redials its hub; with the hub gone for good it gives up after its
        // retries, and then the hub is unknown.
        if env.b.capabilities().redials {
            let gave_up =
                next_event(&mut bev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "hub")).await?;
            ensure!(
                matches!(&gave_up, PeerEvent::Down { reason, .. } if reason.contains("reconnect failed after 2 attempts")),
                "reason: {gave_up:?}"
            );
        }
        let r = bb.send("hub", event("x", 1)).await;
        ensure!(matches!(r, Err(TransportError::UnknownAgent(_))), "send to a closed hub: {r:?}");
        let late = TransportConfig { connection_timeout_ms: 1_000, ..small_cfg() };
        let r = env.b.connect(&addr, "late", late).await;
        ensure!(r.is_err(), "a closed hub accepted a connection");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn max_peers(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", TransportConfig { max_peers: 2, ..small_cfg() }).await?;
        let mut ev = hub.peer_events();
        let first = env.client(&addr, "p1", small_cfg()).await?;
        env.client(&addr, "p2", small_cfg()).await?;
        let third = env.b.connect(&addr, "p3", small_cfg()).await;
        ensure!(
            matches!(third, Err(TransportError::Rejected(RejectReason::Overloaded))),
            "a peer past max_peers must be refused with Overloaded, got {third:?}"
        );
        ensure!(hub.peers().len() == 2, "hub peers {:?}", hub.peers());
        // When one leaves, there is room again.
        first.close().await;
        next_event(&mut ev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "p1")).await?;
        let again = env.client(&addr, "p3", small_cfg()).await?;
        ensure!(again.peers().len() == 1, "p3 must be admitted once there is room");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn max_pending_requests(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let c = env.client(&addr, "c", TransportConfig { max_pending_requests: 4, ..small_cfg() }).await?;
        // Nobody answers yet: four requests may wait, the fifth is refused at once.
        let mut waiting = Vec::new();
        for i in 0..4u64 {
            let c = c.clone();
            waiting.push(tokio::spawn(async move { c.request("hub", "echo", &i, WAIT).await }));
        }
        let deadline = Instant::now() + WAIT;
        while hub.stats().messages_received < 4 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fifth = c.request("hub", "echo", &4u64, WAIT).await;
        ensure!(
            matches!(fifth, Err(TransportError::TooManyPendingRequests { max: 4 })),
            "expected TooManyPendingRequests {{ max: 4 }}, got {fifth:?}"
        );
        spawn_echo(&hub);
        for (i, w) in waiting.into_iter().enumerate() {
            let resp = w.await.ctx("join")?.ctx("pending request")?;
            ensure!(num(&resp)? == i as u64, "request {i} got the wrong response");
        }
        let after = c.request("hub", "echo", &5u64, WAIT).await.ctx("request after the bound freed")?;
        ensure!(num(&after)? == 5, "wrong response after the bound freed");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn hub_100_clients(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        const N: usize = 100;
        let (hub, _addr, cs) = env.star(N, small_cfg()).await?;
        ensure!(hub.peers().len() == N, "hub has {} peers", hub.peers().len());
        // Every client sends one message to the next one, through the hub.
        for (i, c) in cs.iter().enumerate() {
            let to = format!("c{}", (i + 1) % N);
            c.send(to.as_str(), event("ring", i as u64)).await.ctx("send via hub")?;
        }
        for (i, c) in cs.iter().enumerate() {
            let (from, m) = recv(c).await?;
            let prev = (i + N - 1) % N;
            ensure!(from == format!("c{prev}").as_str(), "c{i} got a message from {from}");
            ensure!(num(&m)? == prev as u64, "c{i} got {} instead of {prev}", num(&m)?);
        }
        // One broadcast reaches every other client and the hub exactly once.
        cs[0].broadcast(Message::broadcast("c0", "all", &1u64).ctx("encode")?).await.ctx("broadcast")?;
        cs[0].broadcast(Message::broadcast("c0", "all", &2u64).ctx("encode")?).await.ctx("broadcast")?;
        for node in cs[1..].iter().chain([&hub]) {
            for want in [1u64, 2] {
                let (from, m) = recv(node).await?;
                ensure!(from == "c0" && num(&m)? == want, "{} got {} from {from}", node.agent_id(), num(&m)?);
            }
        }
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn reconnect(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let cfg = TransportConfig {
            retry_attempts: 100,
            reconnect_base_delay_ms: 10,
            reconnect_max_delay_ms: 100,
            ..small_cfg()
        };
        let c = env.client(&addr, "c", cfg).await?;
        let mut news = c.subscribe("news.*").await.ctx("subscribe")?;
        let mut cev = c.peer_events();
        c.send("hub", event("seq", 0)).await.ctx("send")?;
        ensure!(num(&recv(&hub).await?.1)? == 0, "first message lost");
        hub.close().await;
        next_event(&mut cev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "hub")).await?;
        // Sent while disconnected: they wait in the bounded queue.
        for i in 1..=100 {
            c.send("hub", event("seq", i)).await.ctx("send while disconnected")?;
        }
        let hub2 = env.b.listen_at(&addr, "hub", small_cfg()).await.ctx("restart the hub")?;
        env.nodes.push(hub2.clone());
        next_event(&mut cev, |e| matches!(e, PeerEvent::Up { agent, .. } if agent == "hub")).await?;
        for i in 1..=100 {
            let (from, m) = recv(&hub2).await?;
            ensure!(from == "c" && num(&m)? == i, "after reconnect got {} where {i} was due", num(&m)?);
        }
        // The subscription was restored on the new link (it went out before the queued data).
        hub2.publish("news.today", &7u64).await.ctx("publish")?;
        let m = tokio::time::timeout(WAIT, news.recv())
            .await
            .map_err(|_| "subscription not restored")?
            .ok_or("closed")?;
        ensure!(num(&m)? == 7, "wrong event");
        // And requests work again.
        spawn_echo(&hub2);
        let resp = c.request("hub", "echo", &9u64, WAIT).await.ctx("request after reconnect")?;
        ensure!(num(&resp)? == 9, "wrong response");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn reconnect_gives_up(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        // Redials reach no hub: a short connection timeout (see `clean_close`).
        let cfg = TransportConfig {
            retry_attempts: 3,
            reconnect_base_delay_ms: 20,
            connection_timeout_ms: 1_000,
            ..small_cfg()
        };
        let c = env.client(&addr, "c", cfg).await?;
        let mut cev = c.peer_events();
        // A request waiting on the hub (which never answers) fails with a typed error when the
        // retries run out. It is in flight before the hub goes, so the test does not race the
        // redials (which can all fail within milliseconds).
        let waiting = {
            let c = c.clone();
            tokio::spawn(async move { c.request("hub", "echo", &1u64, Duration::from_secs(30)).await })
        };
        let (_, req) = recv(&hub).await?;
        ensure!(req.method() == Some("echo"), "the hub got {req:?}");
        hub.close().await;
        next_event(&mut cev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "hub")).await?;
        let gave_up =
            next_event(&mut cev, |e| matches!(e, PeerEvent::Down { agent, .. } if agent == "hub")).await?;
        ensure!(
            matches!(&gave_up, PeerEvent::Down { reason, .. } if reason.contains("after 3 attempts")),
            "reason: {gave_up:?}"
        );
        let r =
            tokio::time::timeout(WAIT, waiting).await.map_err(|_| "request still waiting")?.ctx("join")?;
        ensure!(matches!(r, Err(TransportError::PeerDown { .. })), "expected PeerDown, got {r:?}");
        let r = c.send("hub", event("x", 1)).await;
        ensure!(matches!(r, Err(TransportError::UnknownAgent(_))), "send after giving up: {r:?}");
        Ok(())
    }
    .await;
    env.finish(r).await
}

async fn subscription_limit(b: Arc<dyn BackendFactory>) -> R {
    let mut env = Env::new(b);
    let r = async {
        let (hub, addr) = env.hub("hub", small_cfg()).await?;
        let mut ev = hub.peer_events();
        let mut raw = env.b.raw_connect(&addr).await.ctx("raw connect")?;
        let hello = Message::control(
            "greedy",
            ControlOperation::Hello {
                version: ProtocolVersion::CURRENT,
                capabilities: vec![],
                metadata: Default::default(),
            },
        );
        raw.send(hello).await.ctx("hello")?;
        tokio::time::timeout(WAIT, raw.recv()).await.map_err(|_| "no HelloAck")?.ctx("recv")?;
        let max = hivewire_core::MAX_PEER_SUBSCRIPTIONS;
        // In steps, each closed by a heartbeat round trip: a burst of thousands of datagrams
        // could overflow a socket buffer on an unreliable backend (udp) and lose some.
        for step in (0..max).collect::<Vec<_>>().chunks(256) {
            for i in step {
                let op = ControlOperation::Subscribe { pattern: format!("t.{i}") };
                raw.send(Message::control("greedy", op)).await.ctx("subscribe")?;
            }
            // At the limit the peer is still connected (the round trip proves the hub read
            // everything before it).
            raw_round_trip(raw.as_mut(), "greedy").await.map_err(|e| {
                format!("link lost at {} of {max} subscriptions: {e}", step[step.len() - 1] + 1)
            })?;
        }
        ensure!(hub.peers().contains(&AgentId::from("greedy")), "dropped at the limit");
        // One more distinct pattern closes only this link (sent again while it stays open, for
        // an unreliable backend).
        let op = ControlOperation::Subscribe { pattern: "t.one-too-many".into() };
        let is_down = |e: &PeerEvent| matches!(e, PeerEvent::Down { agent, .. } if agent == "greedy");
        let deadline = tokio::time::Instant::now() + WAIT;
        raw.send(Message::control("greedy", op.clone())).await.ctx("subscribe")?;
        let down = loop {
            let again = (tokio::time::Instant::now() + Duration::from_millis(500)).min(deadline);
            match tokio::time::timeout_at(again, next_event(&mut ev, is_down)).await {
                Ok(down) => break down?,
                Err(_) if tokio::time::Instant::now() < deadline => {
                    // The hub may have closed the link meanwhile: a failed send is no news.
                    let _ = raw.send(Message::control("greedy", op.clone())).await;
                }
                Err(_) => return Err("the peer over the limit was not dropped".into()),
            }
        };
        ensure!(
            matches!(&down, PeerEvent::Down { reason, .. } if reason.contains("subscriptions")),
            "reason: {down:?}"
        );
        let good = env.client(&addr, "good", small_cfg()).await?;
        ensure!(good.peers().len() == 1, "hub stopped serving");
        Ok(())
    }
    .await;
    env.finish(r).await
}

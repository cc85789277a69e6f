//! The handshake, as two sans-IO state machines.
//!
//! The dialing side ([`ClientHandshake`]) sends `Hello { version, capabilities, metadata }` as
//! its first message; the accepting side ([`ServerHandshake`]) answers `HelloAck` with the
//! negotiated version and capabilities, or `Reject { reason }`. The server checks, in order:
//!
//! 1. the first message is a `Hello` (else `Malformed`);
//! 2. the agent id (the message's source) is not empty (else `Malformed`);
//! 3. same major version ([`ProtocolVersion::negotiate`]; else `VersionMismatch`);
//! 4. the agent id is neither the server's own nor already connected (else `DuplicateAgentId`);
//! 5. the [`Authenticator`], which sees the Hello and the backend's [`PeerInfo`] (else
//!    `Unauthorized`).
//!
//! Capabilities are intersected in the client's order, without duplicates. Both sides give up
//! at their deadline (`now + timeout` at creation).

use std::time::{Duration, Instant};

use crate::message::{AgentId, ControlOperation, Message, MessageType, Metadata, RejectReason};
use crate::version::ProtocolVersion;

/// What one side brings to a handshake.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// This side's agent id.
    pub agent_id: AgentId,
    /// The version this side speaks.
    pub version: ProtocolVersion,
    /// The capabilities it offers.
    pub capabilities: Vec<String>,
    /// Its metadata (for a client: seen by the server's authenticator).
    pub metadata: Metadata,
    /// How long the handshake may take.
    pub timeout: Duration,
}

/// What the backend knows of the peer of a link.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    /// The backend's name (`inproc`, `tcp`, …).
    pub transport: String,
    /// The peer's address, as the backend writes it.
    pub remote_addr: Option<String>,
    /// Backend facts about the peer: credentials, TLS identity, …
    pub attributes: Metadata,
}

/// The client's `Hello`, as the authenticator sees it.
#[derive(Debug, Clone, Copy)]
pub struct HelloInfo<'a> {
    /// The agent id the client claims.
    pub agent_id: &'a AgentId,
    /// The version it offers.
    pub version: ProtocolVersion,
    /// The capabilities it offers.
    pub capabilities: &'a [String],
    /// Its metadata (a token, for instance).
    pub metadata: &'a Metadata,
}

/// Decides whether a listening node accepts a peer.
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok` admits the peer; `Err(why)` rejects it with `Unauthorized(why)`.
    fn authenticate(&self, hello: &HelloInfo<'_>, peer: &PeerInfo) -> Result<(), String>;
}

/// Admits everyone.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &HelloInfo<'_>, _: &PeerInfo) -> Result<(), String> {
        Ok(())
    }
}

impl<F> Authenticator for F
where
    F: Fn(&HelloInfo<'_>, &PeerInfo) -> Result<(), String> + Send + Sync + 'static,
{
    fn authenticate(&self, hello: &HelloInfo<'_>, peer: &PeerInfo) -> Result<(), String> {
        self(hello, peer)
    }
}

/// What a completed handshake agreed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The peer's agent id.
    pub peer_id: AgentId,
    /// The version both speak.
    pub version: ProtocolVersion,
    /// The capabilities both offered.
    pub capabilities: Vec<String>,
    /// The peer's metadata.
    pub peer_metadata: Metadata,
}

impl Negotiated {
    /// True when both sides offered `capability`.
    pub fn has(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer refused us.
    #[error("rejected by the peer: {0}")]
    Rejected(RejectReason),
    /// We refused the peer.
    #[error("refused the peer: {0}")]
    Refused(RejectReason),
    /// No answer before the deadline.
    #[error("handshake timed out")]
    Timeout,
    /// A message other than the expected one, or an invalid one.
    #[error("unexpected handshake message: {0}")]
    Unexpected(String),
}

/// Capabilities in `ours` order that `theirs` also has, without duplicates.
pub fn intersect_capabilities(ours: &[String], theirs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for c in ours {
        if theirs.contains(c) && !out.contains(c) {
            out.push(c.clone());
        }
    }
    out
}

/// The dialing side.
#[derive(Debug)]
pub struct ClientHandshake {
    config: HandshakeConfig,
    hello: Message,
    deadline: Instant,
    done: bool,
}

impl ClientHandshake {
    /// Starts a handshake; the deadline is `now + config.timeout`.
    pub fn new(config: HandshakeConfig, now: Instant) -> Self {
        let hello = Message::control(
            config.agent_id.clone(),
            ControlOperation::Hello {
                version: config.version,
                capabilities: config.capabilities.clone(),
                metadata: config.metadata.clone(),
            },
        );
        ClientHandshake { deadline: now + config.timeout, config, hello, done: false }
    }

    /// The `Hello` to send first.
    pub fn hello(&self) -> Message {
        self.hello.clone()
    }

    /// Handles the server's answer.
    pub fn handle(&mut self, msg: &Message) -> Result<Negotiated, HandshakeError> {
        if self.done {
            return Err(HandshakeError::Unexpected("handshake already finished".into()));
        }
        let op = match &msg.kind {
            MessageType::Control(op) => op,
            other => {
                return Err(HandshakeError::Unexpected(format!("expected HelloAck, got {}", other.name())))
            }
        };
        match op {
            ControlOperation::HelloAck { version, capabilities, metadata } => {
                if self.config.version.negotiate(*version) != Some(*version) {
                    return Err(HandshakeError::Unexpected(format!(
                        "server chose version {version}, not compatible with ours {}",
                        self.config.version
                    )));
                }
                if let Some(c) = capabilities.iter().find(|c| !self.config.capabilities.contains(c)) {
                    return Err(HandshakeError::Unexpected(format!(
                        "server chose capability {c:?} we never offered"
                    )));
                }
                if msg.source.is_empty() {
                    return Err(HandshakeError::Unexpected("HelloAck without an agent id".into()));
                }
                self.done = true;
                Ok(Negotiated {
                    peer_id: msg.source.clone(),
                    version: *version,
                    capabilities: intersect_capabilities(capabilities, capabilities),
                    peer_metadata: metadata.clone(),
                })
            }
            ControlOperation::Reject { reason } => {
                self.done = true;
                Err(HandshakeError::Rejected(reason.clone()))
            }
            other => Err(HandshakeError::Unexpected(format!("expected HelloAck, got {other:?}"))),
        }
    }

    /// When the handshake gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `Err(Timeout)` once `now` reaches the deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if !self.done && now >= self.deadline {
            return Err(HandshakeError::Timeout);
        }
        Ok(())
    }
}

/// The server's decision on a `Hello`.
#[derive(Debug, Clone)]
pub enum ServerOutcome {
    /// Admit the peer: send `reply` (a `HelloAck`).
    Accept {
        /// The `HelloAck` to send.
        reply: Message,
        /// What was agreed.
        negotiated: Negotiated,
    },
    /// Refuse the peer: send `reply` (a `Reject`) and close.
    Reject {
        /// The `Reject` to send.
        reply: Message,
        /// Why.
        reason: RejectReason,
    },
}

/// The accepting side.
#[derive(Debug)]
pub struct ServerHandshake {
    config: HandshakeConfig,
    deadline: Instant,
    done: bool,
}

impl ServerHandshake {
    /// Starts waiting for a `Hello`; the deadline is `now + config.timeout`.
    pub fn new(config: HandshakeConfig, now: Instant) -> Self {
        ServerHandshake { deadline: now + config.timeout, config, done: false }
    }

    /// When the server gives up waiting for `Hello`.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// `Err(Timeout)` once `now` reaches the deadline.
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), HandshakeError> {
        if !self.done && now >= self.deadline {
            return Err(HandshakeError::Timeout);
        }
        Ok(())
    }

    fn reject(&mut self, to: &AgentId, reason: RejectReason) -> ServerOutcome {
        self.done = true;
        let mut reply = Message::control(
            self.config.agent_id.clone(),
            ControlOperation::Reject { reason: reason.clone() },
        );
        if !to.is_empty() {
            reply.destination = Some(to.clone());
        }
        ServerOutcome::Reject { reply, reason }
    }

    /// Decides on the client's first message.
    pub fn handle(
        &mut self,
        msg: &Message,
        peer: &PeerInfo,
        auth: &dyn Authenticator,
        id_taken: &dyn Fn(&AgentId) -> bool,
    ) -> ServerOutcome {
        let (version, capabilities, metadata) = match &msg.kind {
            MessageType::Control(ControlOperation::Hello { version, capabilities, metadata })
                if !self.done =>
            {
                (*version, capabilities, metadata)
            }
            other => {
                return self.reject(
                    &msg.source,
                    RejectReason::Malformed(format!("expected Hello, got {}", other.name())),
                )
            }
        };
        if msg.source.is_empty() {
            return self.reject(&msg.source, RejectReason::Malformed("empty agent id".into()));
        }
        let Some(agreed) = self.config.version.negotiate(version) else {
            return self.reject(
                &msg.source,
                RejectReason::VersionMismatch { ours: self.config.version, theirs: version },
            );
        };
        if msg.source == self.config.agent_id || id_taken(&msg.source) {
            return self.reject(&msg.source, RejectReason::DuplicateAgentId(msg.source.clone()));
        }
        let hello = HelloInfo { agent_id: &msg.source, version, capabilities, metadata };
        if let Err(why) = auth.authenticate(&hello, peer) {
            return self.reject(&msg.source, RejectReason::Unauthorized(why));
        }
        let caps = intersect_capabilities(capabilities, &self.config.capabilities);
        self.done = true;
        let reply = Message::control(
            self.config.agent_id.clone(),
            ControlOperation::HelloAck {
                version: agreed,
                capabilities: caps.clone(),
                metadata: self.config.metadata.clone(),
            },
        )
        .with_destination(msg.source.clone());
        ServerOutcome::Accept {
            reply,
            negotiated: Negotiated {
                peer_id: msg.source.clone(),
                version: agreed,
                capabilities: caps,
                peer_metadata: metadata.clone(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(id: &str, v: ProtocolVersion, caps: &[&str]) -> HandshakeConfig {
        HandshakeConfig {
            agent_id: AgentId::from(id),
            version: v,
            capabilities: caps.iter().map(|c| c.to_string()).collect(),
            metadata: Metadata::new(),
            timeout: Duration::from_secs(5),
        }
    }

    fn run(
        client: HandshakeConfig,
        server: HandshakeConfig,
        taken: &[&str],
    ) -> (ServerOutcome, Result<Negotiated, HandshakeError>) {
        let now = Instant::now();
        let mut c = ClientHandshake::new(client, now);
        let mut s = ServerHandshake::new(server, now);
        let taken: Vec<AgentId> = taken.iter().map(|t| AgentId::from(*t)).collect();
        let out = s.handle(&c.hello(), &PeerInfo::default(), &AllowAll, &|id| taken.contains(id));
        let reply = match &out {
            ServerOutcome::Accept { reply, .. } | ServerOutcome::Reject { reply, .. } => reply.clone(),
        };
        (out, c.handle(&reply))
    }

    #[test]
    fn accept_negotiates_version_and_capabilities() {
        let (out, client) = run(
            cfg("c", ProtocolVersion::new(1, 3), &["zstd", "gzip", "x"]),
            cfg("s", ProtocolVersion::new(1, 1), &["gzip", "zstd"]),
            &[],
        );
        let ServerOutcome::Accept { negotiated, .. } = out else { panic!("rejected") };
        assert_eq!(negotiated.version, ProtocolVersion::new(1, 1));
        assert_eq!(negotiated.capabilities, vec!["zstd".to_string(), "gzip".to_string()]);
        let c = client.unwrap();
        assert_eq!(c.peer_id.as_str(), "s");
        assert_eq!(c.capabilities, negotiated.capabilities);
        assert!(c.has("gzip") && !c.has("x"));
    }

    #[test]
    fn major_mismatch_rejected_on_both_sides() {
        let (out, client) =
            run(cfg("c", ProtocolVersion::new(2, 0), &[]), cfg("s", ProtocolVersion::new(1, 0), &[]), &[]);
        let want = RejectReason::VersionMismatch {
            ours: ProtocolVersion::new(1, 0),
            theirs: ProtocolVersion::new(2, 0),
        };
        assert!(matches!(out, ServerOutcome::Reject { ref reason, .. } if *reason == want));
        assert_eq!(client, Err(HandshakeError::Rejected(want)));
    }

    #[test]
    fn duplicate_and_own_id_rejected() {
        let (out, _) =
            run(cfg("c", ProtocolVersion::CURRENT, &[]), cfg("s", ProtocolVersion::CURRENT, &[]), &["c"]);
        assert!(matches!(out, ServerOutcome::Reject { reason: RejectReason::DuplicateAgentId(_), .. }));
        let (out, _) =
            run(cfg("s", ProtocolVersion::CURRENT, &[]), cfg("s", ProtocolVersion::CURRENT, &[]), &[]);
        assert!(matches!(out, ServerOutcome::Reject { reason: RejectReason::DuplicateAgentId(_), .. }));
    }

    #[test]
    fn authenticator_sees_metadata_and_peer() {
        let now = Instant::now();
        let mut ccfg = cfg("c", ProtocolVersion::CURRENT, &[]);
        ccfg.metadata.insert("token".into(), "good".into());
        let c = ClientHandshake::new(ccfg, now);
        let auth = |h: &HelloInfo<'_>, p: &PeerInfo| {
            if h.metadata.get("token").map(String::as_str) == Some("good") && p.transport == "tcp" {
                Ok(())
            } else {
                Err("no".to_string())
            }
        };
        let tcp = PeerInfo { transport: "tcp".into(), ..PeerInfo::default() };
        let mut s = ServerHandshake::new(cfg("s", ProtocolVersion::CURRENT, &[]), now);
        assert!(matches!(s.handle(&c.hello(), &tcp, &auth, &|_| false), ServerOutcome::Accept { .. }));
        let mut s = ServerHandshake::new(cfg("s", ProtocolVersion::CURRENT, &[]), now);
        let out = s.handle(&c.hello(), &PeerInfo::default(), &auth, &|_| false);
        assert!(
            matches!(out, ServerOutcome::Reject { reason: RejectReason::Unauthorized(ref w), .. } if w == "no")
        );
    }

    #[test]
    fn non_hello_first_message_is_malformed() {
        let mut s = ServerHandshake::new(cfg("s", ProtocolVersion::CURRENT, &[]), Instant::now());
        let out = s.handle(&Message::heartbeat("c"), &PeerInfo::default(), &AllowAll, &|_| false);
        assert!(matches!(out, ServerOutcome::Reject { reason: RejectReason::Malformed(_), .. }));
        let mut s = ServerHandshake::new(cfg("s", ProtocolVersion::CURRENT, &[]), Instant::now());
        let hello = ClientHandshake::new(cfg("", ProtocolVersion::CURRENT, &[]), Instant::now()).hello();
        let out = s.handle(&hello, &PeerInfo::default(), &AllowAll, &|_| false);
        assert!(matches!(out, ServerOutcome::Reject { reason: RejectReason::Malformed(_), .. }));
    }

    #[test]
    fn client_refuses_bad_acks_and_times_out_exactly_at_deadline() {
        let now = Instant::now();
        let mut c = ClientHandshake::new(cfg("c", ProtocolVersion::CURRENT, &["a"]), now);
        let bogus = Message::control(
            "s",
            ControlOperation::HelloAck {
                version: ProtocolVersion::CURRENT,
                capabilities: vec!["b".into()],
                metadata: Metadata::new(),
            },
        );
        assert!(matches!(c.handle(&bogus), Err(HandshakeError::Unexpected(_))));
        let wrong_major = Message::control(
            "s",
            ControlOperation::HelloAck {
                version: ProtocolVersion::new(9, 0),
                capabilities: vec![],
                metadata: Metadata::new(),
            },
        );
        assert!(matches!(c.handle(&wrong_major), Err(HandshakeError::Unexpected(_))));
        assert!(matches!(c.handle(&Message::heartbeat("s")), Err(HandshakeError::Unexpected(_))));
        let d = c.deadline();
        assert_eq!(d, now + Duration::from_secs(5));
        assert!(c.handle_timeout(d - Duration::from_nanos(1)).is_ok());
        assert_eq!(c.handle_timeout(d), Err(HandshakeError::Timeout));
        let mut s = ServerHandshake::new(cfg("s", ProtocolVersion::CURRENT, &[]), now);
        assert_eq!(s.handle_timeout(s.deadline()), Err(HandshakeError::Timeout));
    }

    fn caps() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(
            prop::sample::select(vec!["a", "b", "c", "d", "e"]).prop_map(String::from),
            0..6,
        )
    }

    proptest! {
        #[test]
        fn version_negotiation_is_symmetric(a in 0u16..4, b in 0u16..4, c in 0u16..4, d in 0u16..4) {
            let (x, y) = (ProtocolVersion::new(a, b), ProtocolVersion::new(c, d));
            prop_assert_eq!(x.negotiate(y), y.negotiate(x));
            match x.negotiate(y) {
                Some(v) => { prop_assert_eq!(a, c); prop_assert_eq!(v.minor, b.min(d)); prop_assert_eq!(v.major, a); }
                None => prop_assert_ne!(a, c),
            }
        }

        #[test]
        fn both_sides_agree_or_client_sees_the_servers_reason(
            cc in caps(), sc in caps(), cmaj in 1u16..3, smaj in 1u16..3, cmin in 0u16..3, smin in 0u16..3
        ) {
            let mut client = cfg("c", ProtocolVersion::new(cmaj, cmin), &[]);
            client.capabilities = cc.clone();
            let mut server = cfg("s", ProtocolVersion::new(smaj, smin), &[]);
            server.capabilities = sc.clone();
            let (out, got) = run(client, server, &[]);
            match out {
                ServerOutcome::Accept { negotiated, .. } => {
                    let c = got.expect("client must accept what the server accepted");
                    prop_assert_eq!(&c.capabilities, &negotiated.capabilities);
                    prop_assert_eq!(c.version, negotiated.version);
                    for cap in &c.capabilities {
                        prop_assert!(cc.contains(cap) && sc.contains(cap));
                    }
                    // client order, no duplicates
                    let mut expected: Vec<String> = Vec::new();
                    for x in &cc { if sc.contains(x) && !expected.contains(x) { expected.push(x.clone()); } }
                    prop_assert_eq!(c.capabilities, expected);
                }
                ServerOutcome::Reject { reason, .. } => {
                    prop_assert_eq!(got, Err(HandshakeError::Rejected(reason)));
                }
            }
        }
    }
}

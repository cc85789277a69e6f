//! Heartbeats and dead-peer detection, sans-IO.
//!
//! Every `interval` the tracker asks for a probe (a `Heartbeat` with no correlation id); the
//! peer answers each probe with a `Heartbeat` whose correlation id is the probe's id, and the
//! time between the two gives the round-trip time (smoothed as TCP's SRTT, gain 1/8). Any
//! message from the peer proves it alive; a peer silent for `timeout` is declared dead (once,
//! and it stays dead). The number of probes a peer may miss is thus `timeout / interval`.
//!
//! While the local reader is stalled by local backpressure ([`HeartbeatTracker::set_stalled`]),
//! silence is not the peer's fault: leaving the stall restarts the silence clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::message::{AgentId, Message, MessageId, MessageType};

/// Probes whose answers are still awaited, at most (older ones are forgotten).
pub const MAX_OUTSTANDING_PROBES: usize = 16;

/// Heartbeat timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// Time between probes.
    pub interval: Duration,
    /// Silence after which the peer is dead.
    pub timeout: Duration,
}

/// What the caller should do now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeartbeatAction {
    /// Nothing is due.
    Idle,
    /// Send this probe.
    SendProbe(Message),
    /// The peer has been silent past the timeout.
    PeerDead {
        /// How long it has been silent.
        silent_for: Duration,
    },
}

/// Tracks one peer's liveness and round-trip time.
#[derive(Debug)]
pub struct HeartbeatTracker {
    local: AgentId,
    config: HeartbeatConfig,
    last_receive: Instant,
    next_probe: Instant,
    outstanding: VecDeque<(MessageId, Instant)>,
    srtt: Option<Duration>,
    last_rtt: Option<Duration>,
    stalled: bool,
    dead: bool,
}

impl HeartbeatTracker {
    /// A tracker whose first probe is due one interval from `now`.
    pub fn new(local: AgentId, config: HeartbeatConfig, now: Instant) -> Self {
        HeartbeatTracker {
            local,
            config,
            last_receive: now,
            next_probe: now + config.interval,
            outstanding: VecDeque::new(),
            srtt: None,
            last_rtt: None,
            stalled: false,
            dead: false,
        }
    }

    /// Any message from the peer arrived.
    pub fn on_receive(&mut self, now: Instant) {
        if now > self.last_receive {
            self.last_receive = now;
        }
    }

    /// Handles a `Heartbeat` from the peer: a probe yields the reply to send; a reply to one of
    /// our probes updates the RTT. Anything else yields `None`.
    pub fn on_heartbeat(&mut self, msg: &Message, now: Instant) -> Option<Message> {
        self.on_receive(now);
        if !matches!(msg.kind, MessageType::Heartbeat) {
            return None;
        }
        match msg.correlation_id {
            None => Some(Message::heartbeat_reply(self.local.clone(), msg)),
            Some(id) => {
                if let Some(pos) = self.outstanding.iter().position(|(p, _)| *p == id) {
                    let (_, sent) = self.outstanding.remove(pos)?;
                    let rtt = now.saturating_duration_since(sent);
                    self.last_rtt = Some(rtt);
                    self.srtt = Some(match self.srtt {
                        None => rtt,
                        Some(s) => (s * 7 + rtt) / 8,
                    });
                }
                None
            }
        }
    }

    /// What is due at `now`.
    pub fn poll(&mut self, now: Instant) -> HeartbeatAction {
        if self.stalled {
            self.last_receive = self.last_receive.max(now);
        }
        let silent = now.saturating_duration_since(self.last_receive);
        if self.dead || silent >= self.config.timeout {
            self.dead = true;
            return HeartbeatAction::PeerDead { silent_for: silent };
        }
        if now >= self.next_probe {
            self.next_probe = now + self.config.interval;
            let probe = Message::heartbeat(self.local.clone());
            if self.outstanding.len() >= MAX_OUTSTANDING_PROBES {
                self.outstanding.pop_front();
            }
            self.outstanding.push_back((probe.id, now));
            return HeartbeatAction::SendProbe(probe);
        }
        HeartbeatAction::Idle
    }

    /// When [`poll`](Self::poll) should next be called.
    pub fn next_deadline(&self) -> Instant {
        self.next_probe.min(self.last_receive + self.config.timeout)
    }

    /// Smoothed round-trip time, after the first answered probe.
    pub fn rtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The latest round-trip sample.
    pub fn last_rtt(&self) -> Option<Duration> {
        self.last_rtt
    }

    /// True once the peer was declared dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// Marks the local reader as stalled (or not). Leaving the stall restarts the silence clock.
    pub fn set_stalled(&mut self, stalled: bool, now: Instant) {
        if self.stalled && !stalled {
            self.last_receive = self.last_receive.max(now);
        }
        self.stalled = stalled;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(now: Instant) -> HeartbeatTracker {
        HeartbeatTracker::new(
            AgentId::from("me"),
            HeartbeatConfig { interval: Duration::from_millis(100), timeout: Duration::from_millis(350) },
            now,
        )
    }

    #[test]
    fn probes_every_interval_and_dies_exactly_at_timeout() {
        let t0 = Instant::now();
        let mut hb = tracker(t0);
        assert_eq!(hb.poll(t0), HeartbeatAction::Idle);
        assert_eq!(hb.next_deadline(), t0 + Duration::from_millis(100));
        assert!(matches!(hb.poll(t0 + Duration::from_millis(100)), HeartbeatAction::SendProbe(_)));
        assert_eq!(hb.poll(t0 + Duration::from_millis(150)), HeartbeatAction::Idle);
        assert!(matches!(hb.poll(t0 + Duration::from_millis(200)), HeartbeatAction::SendProbe(_)));
        assert!(!matches!(hb.poll(t0 + Duration::from_millis(349)), HeartbeatAction::PeerDead { .. }));
        assert_eq!(
            hb.poll(t0 + Duration::from_millis(350)),
            HeartbeatAction::PeerDead { silent_for: Duration::from_millis(350) }
        );
        // Sticky.
        hb.on_receive(t0 + Duration::from_millis(360));
        assert!(matches!(hb.poll(t0 + Duration::from_millis(361)), HeartbeatAction::PeerDead { .. }));
        assert!(hb.is_dead());
    }

    #[test]
    fn traffic_keeps_the_peer_alive() {
        let t0 = Instant::now();
        let mut hb = tracker(t0);
        for i in 1..20 {
            let now = t0 + Duration::from_millis(100 * i);
            hb.on_receive(now);
            assert!(!matches!(hb.poll(now), HeartbeatAction::PeerDead { .. }));
        }
    }

    #[test]
    fn answers_probes_and_measures_rtt_of_its_own_only() {
        let t0 = Instant::now();
        let mut hb = tracker(t0);
        let theirs = Message::heartbeat("peer");
        let reply = hb.on_heartbeat(&theirs, t0).expect("a probe gets a reply");
        assert_eq!(reply.correlation_id, Some(theirs.id));
        let HeartbeatAction::SendProbe(probe) = hb.poll(t0 + Duration::from_millis(100)) else { panic!() };
        let stranger = Message::heartbeat_reply("peer", &Message::heartbeat("x"));
        assert!(hb.on_heartbeat(&stranger, t0 + Duration::from_millis(110)).is_none());
        assert_eq!(hb.rtt(), None);
        let answer = Message::heartbeat_reply("peer", &probe);
        assert!(hb.on_heartbeat(&answer, t0 + Duration::from_millis(120)).is_none());
        assert_eq!(hb.rtt(), Some(Duration::from_millis(20)));
        assert_eq!(hb.last_rtt(), Some(Duration::from_millis(20)));
        // A duplicate answer does not count twice.
        hb.on_heartbeat(&answer, t0 + Duration::from_millis(190));
        assert_eq!(hb.last_rtt(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn outstanding_probes_are_bounded() {
        let t0 = Instant::now();
        let mut hb = HeartbeatTracker::new(
            AgentId::from("me"),
            HeartbeatConfig { interval: Duration::from_millis(1), timeout: Duration::from_secs(100) },
            t0,
        );
        for i in 1..100 {
            hb.on_receive(t0 + Duration::from_millis(i));
            hb.poll(t0 + Duration::from_millis(i));
        }
        assert!(hb.outstanding.len() <= MAX_OUTSTANDING_PROBES);
    }

    #[test]
    fn a_stall_is_not_the_peers_silence() {
        let t0 = Instant::now();
        let mut hb = tracker(t0);
        hb.set_stalled(true, t0 + Duration::from_millis(10));
        assert!(!matches!(hb.poll(t0 + Duration::from_secs(5)), HeartbeatAction::PeerDead { .. }));
        hb.set_stalled(false, t0 + Duration::from_secs(6));
        assert!(!matches!(hb.poll(t0 + Duration::from_millis(6349)), HeartbeatAction::PeerDead { .. }));
        assert!(matches!(hb.poll(t0 + Duration::from_millis(6350)), HeartbeatAction::PeerDead { .. }));
    }
}

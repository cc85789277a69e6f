//! hivewire's in-process backend: agents in one process exchange `Message` values over bounded
//! tokio channels — no encoding, no copies of the payload.
//!
//! Two ways in: [`InProcessTransport::create_pair`] for two directly connected agents, and named
//! endpoints (`inproc://name`): one [`InProcessTransport::listen`] hub that many
//! [`InProcessTransport::connect`] agents join. Everything else (handshake, heartbeats, routing,
//! requests, pub/sub) is `hivewire-core`'s engine, identical to every other backend.
//!
//! ```
//! use hivewire_inproc::InProcessTransport;
//! use hivewire_core::{Message, TransportConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! let (agent1, agent2) =
//!     InProcessTransport::create_pair("agent_1", "agent_2", TransportConfig::default()).await?;
//! let request = Message::request("agent_1", "compute_fibonacci", &serde_json::json!({"n": 42}))?;
//! agent1.send("agent_2", request).await?;
//! let (sender, message) = agent2.receive().await?;
//! assert_eq!(sender.as_str(), "agent_1");
//! assert_eq!(message.method(), Some("compute_fibonacci"));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use hivewire_core::{
    Acceptor, AgentId, Link, LinkRx, LinkTx, Message, Node, PeerInfo, TransportConfig, TransportError,
};
use tokio::sync::mpsc;

/// URL scheme of this backend.
pub const SCHEME: &str = "inproc";
/// Batches that may wait in one direction of a link (each batch holds at most the engine's
/// write batch, 128 messages): bounds a link's memory while letting the writer run ahead.
const LINK_BATCHES: usize = 64;
/// Links that may wait for a listener to accept them.
const ACCEPT_BACKLOG: usize = 1024;

/// Sending half of an in-process link.
#[derive(Debug)]
pub struct InprocTx {
    tx: Option<mpsc::Sender<Vec<Message>>>,
}

/// Receiving half of an in-process link.
#[derive(Debug)]
pub struct InprocRx {
    rx: mpsc::Receiver<Vec<Message>>,
    buf: VecDeque<Message>,
}

/// An in-process link.
pub type InprocLink = Link<InprocTx, InprocRx>;

impl LinkTx for InprocTx {
    async fn send_batch(&mut self, batch: &mut Vec<Message>) -> Result<(), TransportError> {
        let Some(tx) = &self.tx else {
            return Err(TransportError::ConnectionError("in-process link closed".into()));
        };
        let out = std::mem::replace(batch, Vec::with_capacity(batch.capacity()));
        tx.send(out)
            .await
            .map_err(|_| TransportError::ConnectionError("in-process peer dropped the link".into()))
    }

    async fn close(&mut self) {
        self.tx = None;
    }
}

impl LinkRx for InprocRx {
    async fn recv(&mut self) -> Result<Option<Message>, TransportError> {
        loop {
            if let Some(m) = self.buf.pop_front() {
                return Ok(Some(m));
            }
            match self.rx.recv().await {
                Some(batch) => self.buf.extend(batch),
                None => return Ok(None),
            }
        }
    }

    /// Only what the batch in hand still holds: the next batch comes through `recv`, whose
    /// channel receive counts against tokio's cooperative budget.
    fn try_recv_buffered(&mut self) -> Result<Option<Message>, TransportError> {
        Ok(self.buf.pop_front())
    }
}

/// Two connected in-process links: what `a` sends, `b` receives, and back.
pub fn link_pair(a_sees: PeerInfo, b_sees: PeerInfo) -> (InprocLink, InprocLink) {
    let (tx_ab, rx_ab) = mpsc::channel(LINK_BATCHES);
    let (tx_ba, rx_ba) = mpsc::channel(LINK_BATCHES);
    let a = Link::new(InprocTx { tx: Some(tx_ab) }, InprocRx { rx: rx_ba, buf: VecDeque::new() }, a_sees);
    let b = Link::new(InprocTx { tx: Some(tx_ba) }, InprocRx { rx: rx_ab, buf: VecDeque::new() }, b_sees);
    (a, b)
}

struct Registered {
    id: u64,
    accept: mpsc::Sender<InprocLink>,
}

fn registry() -> &'static Mutex<HashMap<String, Registered>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Registered>>> = OnceLock::new();
    REGISTRY.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock_registry() -> std::sync::MutexGuard<'static, HashMap<String, Registered>> {
    registry().lock().unwrap_or_else(|p| p.into_inner())
}

fn peer_info(name: &str) -> PeerInfo {
    PeerInfo {
        transport: SCHEME.into(),
        remote_addr: Some(format!("{SCHEME}://{name}")),
        ..PeerInfo::default()
    }
}

/// Constructors of in-process nodes.
#[derive(Debug, Clone, Copy)]
pub struct InProcessTransport;

impl InProcessTransport {
    /// Two agents connected to each other (`b` accepts, `a` dials); returns after the
    /// handshake.
    pub async fn create_pair(
        a: impl Into<AgentId>,
        b: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<(Node, Node), TransportError> {
        let a = Node::new(a, config.clone(), SCHEME);
        let b = Node::new(b, config, SCHEME);
        let (la, lb) = link_pair(peer_info(b.agent_id()), peer_info(a.agent_id()));
        b.accept_link(lb);
        a.connect_link(la).await?;
        Ok((a, b))
    }

    /// A hub listening on `inproc://name`. Fails if a live listener already has the name.
    pub async fn listen(
        name: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<Node, TransportError> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        if name.is_empty() {
            return Err(TransportError::InvalidUrl {
                url: format!("{SCHEME}://"),
                reason: "empty endpoint name".into(),
            });
        }
        let node = Node::new(agent_id, config, SCHEME);
        node.set_hub(true);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel::<InprocLink>(ACCEPT_BACKLOG);
        {
            let mut reg = lock_registry();
            if let Some(existing) = reg.get(name) {
                if !existing.accept.is_closed() {
                    return Err(TransportError::ConnectionError(format!(
                        "address in use: an in-process listener named {name:?} is alive"
                    )));
                }
            }
            reg.insert(name.to_string(), Registered { id, accept: tx });
        }
        let owned = name.to_string();
        node.on_close(move || {
            let mut reg = lock_registry();
            if reg.get(&owned).is_some_and(|r| r.id == id) {
                reg.remove(&owned);
            }
        });
        node.spawn_accept_loop(InprocAcceptor(rx), |node, link| node.accept_link(link));
        Ok(node)
    }

    /// A raw link to the hub listening on `inproc://name`, with no node behind it: the caller
    /// speaks the protocol itself (tests of misbehaving peers use this).
    pub async fn dial_link(name: &str, client: PeerInfo) -> Result<InprocLink, TransportError> {
        let accept = lock_registry().get(name).map(|r| r.accept.clone());
        let Some(accept) = accept else {
            return Err(TransportError::ConnectionError(format!(
                "connection refused: no in-process listener named {name:?}"
            )));
        };
        let (mine, theirs) = link_pair(peer_info(name), client);
        accept
            .send(theirs)
            .await
            .map_err(|_| TransportError::ConnectionError(format!("in-process listener {name:?} closed")))?;
        Ok(mine)
    }

    /// An agent connected to the hub listening on `inproc://name`; returns after the handshake.
    /// If the hub goes away, the node redials the name (see `Node::connect_with_redial`).
    pub async fn connect(
        name: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<Node, TransportError> {
        let timeout = config.connection_timeout();
        let me: AgentId = agent_id.into();
        let name = name.to_string();
        let id = me.clone();
        Node::dial(id, config, SCHEME, move || {
            let (name, me) = (name.clone(), me.clone());
            async move {
                let accept = lock_registry().get(&name).map(|r| r.accept.clone());
                let Some(accept) = accept else {
                    return Err(TransportError::ConnectionError(format!(
                        "connection refused: no in-process listener named {name:?}"
                    )));
                };
                let (client, server) = link_pair(peer_info(&name), peer_info(&me));
                match tokio::time::timeout(timeout, accept.send(server)).await {
                    Ok(Ok(())) => Ok(client),
                    Ok(Err(_)) => Err(TransportError::ConnectionError(format!(
                        "connection refused: in-process listener {name:?} closed"
                    ))),
                    Err(_) => Err(TransportError::Timeout),
                }
            }
        })
        .await
    }
}

/// The listener's queue of incoming links as the engine's [`Acceptor`].
struct InprocAcceptor(mpsc::Receiver<InprocLink>);

impl Acceptor for InprocAcceptor {
    type Conn = InprocLink;
    async fn accept(&mut self) -> std::io::Result<Option<InprocLink>> {
        Ok(self.0.recv().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniq(tag: &str) -> String {
        static N: AtomicU64 = AtomicU64::new(0);
        format!("{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
    }

    #[tokio::test]
    async fn name_in_use_is_refused_and_freed_on_close() {
        let name = uniq("inuse");
        let hub = InProcessTransport::listen(&name, "hub", TransportConfig::default()).await.unwrap();
        let second = InProcessTransport::listen(&name, "hub2", TransportConfig::default()).await;
        assert!(matches!(second, Err(TransportError::ConnectionError(ref m)) if m.contains("in use")));
        hub.close().await;
        let third = InProcessTransport::listen(&name, "hub3", TransportConfig::default()).await.unwrap();
        third.close().await;
    }

    #[tokio::test]
    async fn connect_to_missing_name_is_refused() {
        let r = InProcessTransport::connect(&uniq("missing"), "a", TransportConfig::default()).await;
        assert!(matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("refused")));
    }

    #[tokio::test]
    async fn values_cross_without_copying_the_payload() {
        let (a, b) = InProcessTransport::create_pair("a", "b", TransportConfig::default()).await.unwrap();
        let payload = hivewire_core::protocol::encode_payload(&vec![7u8; 4096]).unwrap();
        let ptr = payload.as_ptr();
        let msg = Message::new("a", hivewire_core::MessageType::Event { topic: "t".into() })
            .with_payload_bytes(payload);
        a.send("b", msg).await.unwrap();
        let (_, got) = b.receive().await.unwrap();
        assert_eq!(got.payload().as_ptr(), ptr, "inproc must carry the same bytes, not a copy");
        a.close().await;
        b.close().await;
    }
}

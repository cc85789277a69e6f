//! hivewire's TCP backend: `tcp://host:port`.
//!
//! Only what is specific to TCP lives here — listening, dialing, socket options — and each
//! connection becomes a [`framed_link`](hivewire_core::framed_link): the engine and the codec do
//! the rest. Writes are coalesced by the engine (a batch of queued messages is one `write`), and
//! `TCP_NODELAY` is on by default so an idle link sends at once.
//!
//! ```
//! use hivewire_tcp::{TcpOptions, TcpTransport};
//! use hivewire_core::TransportConfig;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! let hub = TcpTransport::listen("127.0.0.1:0", "hub", TransportConfig::default(), TcpOptions::default()).await?;
//! let url = hub.listen_url().expect("bound");
//! let addr = url.trim_start_matches("tcp://");
//! let agent = TcpTransport::connect(addr, "agent", TransportConfig::default(), TcpOptions::default()).await?;
//! assert_eq!(agent.peers()[0].as_str(), "hub");
//! agent.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod tls;

#[cfg(feature = "test-pki")]
pub use hivewire_core::test_pki;

pub use hivewire_core::tls::{client_config, server_config, CLIENT_CERT_SHA256};
pub use tls::{TlsTransport, TLS_SCHEME};

use std::net::SocketAddr;
use std::time::Duration;

use hivewire_core::{
    framed_halves, Acceptor, AgentId, FramedRx, FramedTx, Link, Node, PeerInfo, TransportConfig,
    TransportError,
};
use socket2::{SockRef, TcpKeepalive};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{debug, info};

/// URL scheme of this backend.
pub const SCHEME: &str = "tcp";
/// Pending connections the kernel queues for `accept` (the listen backlog).
const BACKLOG: u32 = 1024;

/// TCP socket options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpOptions {
    /// `TCP_NODELAY`: send small writes at once (default on; the engine batches already).
    pub nodelay: bool,
    /// TCP keep-alive idle time; `None` leaves the system default (off). The protocol heartbeat
    /// detects dead peers either way; keep-alive also keeps middleboxes' state alive.
    pub keepalive: Option<Duration>,
    /// `SO_REUSEADDR` on the listening socket (default on: a restarted listener can rebind a
    /// port whose old connections are in TIME_WAIT).
    pub reuse_addr: bool,
    /// IP time-to-live of outgoing packets; `None` leaves the system default.
    pub ttl: Option<u32>,
}

impl Default for TcpOptions {
    fn default() -> Self {
        TcpOptions { nodelay: true, keepalive: None, reuse_addr: true, ttl: None }
    }
}

fn configure(stream: &TcpStream, opts: &TcpOptions) -> std::io::Result<()> {
    stream.set_nodelay(opts.nodelay)?;
    if let Some(ttl) = opts.ttl {
        stream.set_ttl(ttl)?;
    }
    if let Some(idle) = opts.keepalive {
        SockRef::from(stream).set_tcp_keepalive(&TcpKeepalive::new().with_time(idle))?;
    }
    Ok(())
}

fn peer_info(stream: &TcpStream) -> PeerInfo {
    let mut info = PeerInfo { transport: SCHEME.into(), ..PeerInfo::default() };
    if let Ok(a) = stream.peer_addr() {
        info.remote_addr = Some(a.to_string());
    }
    if let Ok(a) = stream.local_addr() {
        info.attributes.insert("local_addr".into(), a.to_string());
    }
    info
}

/// A framed link over a TCP stream's owned halves.
pub type TcpLink = Link<FramedTx<OwnedWriteHalf>, FramedRx<OwnedReadHalf>>;

/// Wraps an established TCP stream as a framed link for `node`.
pub fn link_for(node: &Node, stream: TcpStream) -> TcpLink {
    let cfg = node.config();
    tcp_link(stream, cfg.max_message_size, cfg.compression_threshold)
}

/// The stream's owned halves (no lock shared between the reader and the writer, unlike a
/// generic split) as a framed link.
fn tcp_link(stream: TcpStream, max: usize, threshold: usize) -> TcpLink {
    let info = peer_info(&stream);
    let (r, w) = stream.into_split();
    framed_halves(r, w, max, threshold, info)
}

/// Constructors of TCP nodes.
#[derive(Debug, Clone, Copy)]
pub struct TcpTransport;

impl TcpTransport {
    /// A hub listening on `addr` (`host:port`; port 0 picks a free one — see
    /// [`Node::listen_url`]).
    pub async fn listen(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: TcpOptions,
    ) -> Result<Node, TransportError> {
        let listener = bind(addr, &opts).await?;
        let local = listener.local_addr()?;
        let node = Node::new(agent_id, config, SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{SCHEME}://{local}"));
        info!(%local, agent = %node.agent_id(), "tcp listener up");
        node.spawn_accept_loop(TcpAcceptor(listener), move |node, (stream, remote)| {
            if let Err(e) = configure(&stream, &opts) {
                debug!(%remote, error = %e, "could not set socket options; dropping the connection");
                return;
            }
            node.accept_link(link_for(node, stream));
        });
        Ok(node)
    }

    /// An agent connected to the hub at `addr` (`host:port`); returns after the handshake.
    /// Dialing and the handshake each get `connection_timeout_ms`. If the connection drops
    /// later, the node redials (see `Node::connect_with_redial`).
    pub async fn connect(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: TcpOptions,
    ) -> Result<Node, TransportError> {
        let timeout = config.connection_timeout();
        let (max, threshold) = (config.max_message_size, config.compression_threshold);
        let addr = addr.to_string();
        Node::dial(agent_id, config, SCHEME, move || {
            let (addr, opts) = (addr.clone(), opts.clone());
            async move {
                let stream = dial(&addr, &opts, timeout).await?;
                Ok(tcp_link(stream, max, threshold))
            }
        })
        .await
    }
}

/// A bound TCP listener as the engine's [`Acceptor`].
pub(crate) struct TcpAcceptor(pub(crate) TcpListener);

impl Acceptor for TcpAcceptor {
    type Conn = (TcpStream, SocketAddr);
    async fn accept(&mut self) -> std::io::Result<Option<Self::Conn>> {
        self.0.accept().await.map(Some)
    }
}

async fn resolve(addr: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| TransportError::InvalidUrl { url: format!("{SCHEME}://{addr}"), reason: e.to_string() })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::InvalidUrl {
            url: format!("{SCHEME}://{addr}"),
            reason: "resolves to no address".into(),
        });
    }
    Ok(addrs)
}

async fn bind(addr: &str, opts: &TcpOptions) -> Result<TcpListener, TransportError> {
    let mut last = None;
    for a in resolve(addr).await? {
        let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(opts.reuse_addr)?;
        match socket.bind(a).and_then(|()| socket.listen(BACKLOG)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(TransportError::ConnectionError(format!(
        "cannot listen on {addr}: {}",
        last.map_or_else(|| "no address".to_string(), |e| e.to_string())
    )))
}

async fn dial(addr: &str, opts: &TcpOptions, timeout: Duration) -> Result<TcpStream, TransportError> {
    let mut last = None;
    for a in resolve(addr).await? {
        match tokio::time::timeout(timeout, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                if let Err(e) = hivewire_core::net::refuse_self_connection(&s, addr) {
                    last = Some(e.to_string());
                    continue;
                }
                configure(&s, opts)?;
                return Ok(s);
            }
            Ok(Err(e)) => last = Some(format!("{a}: {e}")),
            Err(_) => last = Some(format!("{a}: timed out after {timeout:?}")),
        }
    }
    Err(TransportError::ConnectionError(format!(
        "cannot connect to {addr}: {}",
        last.unwrap_or_else(|| "no address".into())
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refused_connection_is_a_connection_error() {
        // Bind and drop to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = TcpTransport::connect(
            &format!("127.0.0.1:{port}"),
            "a",
            TransportConfig::default(),
            TcpOptions::default(),
        )
        .await;
        assert!(
            matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("cannot connect")),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn listener_reports_its_port_and_options_apply() {
        let opts =
            TcpOptions { keepalive: Some(Duration::from_secs(30)), ttl: Some(32), ..TcpOptions::default() };
        let hub = TcpTransport::listen("127.0.0.1:0", "hub", TransportConfig::default(), opts.clone())
            .await
            .unwrap();
        let url = hub.listen_url().unwrap();
        assert!(url.starts_with("tcp://127.0.0.1:") && !url.ends_with(":0"), "{url}");
        let stream = dial(url.trim_start_matches("tcp://"), &opts, Duration::from_secs(5)).await.unwrap();
        assert!(stream.nodelay().unwrap());
        assert_eq!(stream.ttl().unwrap(), 32);
        assert!(SockRef::from(&stream).keepalive().unwrap());
        hub.close().await;
    }

    #[tokio::test]
    async fn bad_address_is_invalid_url() {
        let r = TcpTransport::connect("no-port-here", "a", TransportConfig::default(), TcpOptions::default())
            .await;
        assert!(matches!(r, Err(TransportError::InvalidUrl { .. })), "{r:?}");
    }
}

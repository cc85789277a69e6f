//! hivewire's WebSocket backend: `ws://host:port/path` and `wss://host:port/path`.
//!
//! Binary WebSocket messages carry codec frames (see `docs/WIRE.md`); the engine and the codec
//! do the rest, exactly as over TCP. What is specific to WebSocket lives here:
//!
//! * the upgrade, with the subprotocol `hivewire.v1` required and echoed;
//! * the listener's policy, checked on the request head before any WebSocket state exists:
//!   one path, an origin allow-list, a connection limit and an optional bearer token
//!   (`Authorization: Bearer …` or `?token=…`, since browsers cannot set headers on a
//!   WebSocket); each refusal is an HTTP status with a one-line reason;
//! * `wss://` with the same certificate options as `tls://` ([`TlsConfig`](hivewire_core::TlsConfig));
//! * WebSocket pings on a period, beside the protocol heartbeat, for proxies that drop quiet
//!   connections;
//! * batching: the frames of one engine batch travel in one binary message.
//!
//! ```
//! use hivewire_core::TransportConfig;
//! use hivewire_ws::{WebSocketTransport, WsMode};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! let hub = WebSocketTransport::new(
//!     WsMode::Server { bind_addr: "127.0.0.1:0".into() }, "hub", TransportConfig::default()).await?;
//! let url = hub.listen_url().expect("bound"); // ws://127.0.0.1:PORT/
//! let agent = WebSocketTransport::new(WsMode::Client { url }, "agent", TransportConfig::default()).await?;
//! assert_eq!(agent.peers()[0].as_str(), "hub");
//! agent.close().await;
//! hub.close().await;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod link;
mod upgrade;

pub use link::{WsRx, WsTx, BATCH_BYTES};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hivewire_core::tls::{
    cert_fingerprint, client_config, server_config, server_name_for, CLIENT_CERT_SHA256,
};
use hivewire_core::{Acceptor, AgentId, Link, Node, PeerInfo, TransportConfig, TransportError};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, Response};
use tokio_tungstenite::tungstenite::Error as WsError;
use tracing::{debug, info, warn};

use crate::link::{ws_config, ws_error, ws_link, Role};
use crate::upgrade::{check, read_head, refuse, Refusal, Replay};

/// URL scheme of plain WebSocket.
pub const WS_SCHEME: &str = "ws";
/// URL scheme of WebSocket over TLS.
pub const WSS_SCHEME: &str = "wss";
/// The WebSocket subprotocol a client must offer; the listener echoes it.
pub const SUBPROTOCOL: &str = "hivewire.v1";
/// Query parameter that may carry the bearer token (`ws://host/path?token=…`).
pub const TOKEN_QUERY_PARAM: &str = "token";
/// `PeerInfo` attribute: the `Origin` header of the upgrade request, if any.
pub const ORIGIN_ATTR: &str = "ws.origin";
/// `PeerInfo` attribute: the path the client upgraded on.
pub const PATH_ATTR: &str = "ws.path";
/// `PeerInfo` attribute: the bearer token the client presented, for an authenticator that maps
/// tokens to identities.
pub const TOKEN_ATTR: &str = "ws.bearer_token";
/// Pending TCP connections the kernel queues for `accept`.
const BACKLOG: u32 = 1024;
/// Connections over the limit that may wait at once for their 503 answer; beyond, they are
/// closed without one.
const MAX_REFUSING: usize = 64;

/// WebSocket settings; the listener's policy and the client's token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsOptions {
    /// The one path the listener upgrades (default `/`); other paths get 404.
    pub path: String,
    /// Origins a browser page may connect from (`scheme://host[:port]`, compared without case).
    /// `None` (the default) allows any. A request without an `Origin` header does not come
    /// from a browser page and is not subject to the list.
    pub allowed_origins: Option<Vec<String>>,
    /// Most WebSocket connections the listener holds at once, counting upgrades in progress
    /// (default 1024); the next ones get 503.
    pub max_connections: usize,
    /// Listener: the bearer token every client must present (401 otherwise). Client: the token
    /// to present in the `Authorization` header.
    pub bearer_token: Option<String>,
    /// Period of WebSocket pings (default 20 s); `None` sends none.
    pub ping_interval: Option<Duration>,
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            path: "/".into(),
            allowed_origins: None,
            max_connections: 1024,
            bearer_token: None,
            ping_interval: Some(Duration::from_secs(20)),
        }
    }
}

/// Which side to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMode {
    /// Listen for `ws://` on `bind_addr` (`host:port`).
    Server {
        /// `host:port`; port 0 picks a free one.
        bind_addr: String,
    },
    /// Listen for `wss://` on `bind_addr`, with the certificate from `TransportConfig::tls`.
    SecureServer {
        /// `host:port`; port 0 picks a free one.
        bind_addr: String,
    },
    /// Dial a `ws://` or `wss://` URL.
    Client {
        /// `ws://host:port/path` or `wss://…`; a `?token=` query is sent as is.
        url: String,
    },
}

/// Constructors of WebSocket nodes.
#[derive(Debug, Clone, Copy)]
pub struct WebSocketTransport;

impl WebSocketTransport {
    /// A node in `mode` with default [`WsOptions`]. (Named `new` like the other transports'
    /// constructors; it returns the running [`Node`].)
    #[allow(clippy::new_ret_no_self)]
    pub async fn new(
        mode: WsMode,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<Node, TransportError> {
        Self::with_options(mode, agent_id, config, WsOptions::default()).await
    }

    /// A node in `mode` with `opts`.
    pub async fn with_options(
        mode: WsMode,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: WsOptions,
    ) -> Result<Node, TransportError> {
        match mode {
            WsMode::Server { bind_addr } => listen(&bind_addr, false, agent_id, config, opts).await,
            WsMode::SecureServer { bind_addr } => listen(&bind_addr, true, agent_id, config, opts).await,
            WsMode::Client { url } => connect(&url, agent_id, config, opts).await,
        }
    }

    /// A hub listening on a `ws://host:port/path` or `wss://…` URL (the path becomes
    /// [`WsOptions::path`]).
    pub async fn listen_url(
        url: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        mut opts: WsOptions,
    ) -> Result<Node, TransportError> {
        let target = Target::parse(url)?;
        opts.path = target.path;
        listen(&target.authority, target.secure, agent_id, config, opts).await
    }

    /// An agent connected to the hub at a `ws://` or `wss://` URL.
    pub async fn connect(
        url: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: WsOptions,
    ) -> Result<Node, TransportError> {
        connect(url, agent_id, config, opts).await
    }
}

/// A parsed `ws://` / `wss://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    secure: bool,
    /// `host:port`, the port defaulted (80 / 443).
    authority: String,
    /// The path without the query.
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, TransportError> {
        let bad = |reason: String| TransportError::InvalidUrl { url: url.to_string(), reason };
        let u = url::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        let secure = match u.scheme() {
            WS_SCHEME => false,
            WSS_SCHEME => true,
            other => return Err(bad(format!("expected ws:// or wss://, not {other}://"))),
        };
        let host = u.host_str().ok_or_else(|| bad("no host".into()))?;
        let port = u.port_or_known_default().ok_or_else(|| bad("no port".into()))?;
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Target { secure, authority, path: u.path().to_string() })
    }
}

struct WsAcceptor(TcpListener);

impl Acceptor for WsAcceptor {
    type Conn = (TcpStream, SocketAddr);
    async fn accept(&mut self) -> std::io::Result<Option<Self::Conn>> {
        self.0.accept().await.map(Some)
    }
}

async fn bind(addr: &str) -> Result<TcpListener, TransportError> {
    let mut last = None;
    let addrs = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| TransportError::InvalidUrl { url: addr.to_string(), reason: e.to_string() })?;
    for a in addrs {
        let socket = if a.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
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

async fn listen(
    addr: &str,
    secure: bool,
    agent_id: impl Into<AgentId>,
    config: TransportConfig,
    opts: WsOptions,
) -> Result<Node, TransportError> {
    if !opts.path.starts_with('/') {
        return Err(TransportError::InvalidUrl {
            url: opts.path.clone(),
            reason: "the WebSocket path must start with /".into(),
        });
    }
    let tls = if secure { Some(TlsAcceptor::from(server_config(&config.tls)?)) } else { None };
    let scheme = if secure { WSS_SCHEME } else { WS_SCHEME };
    let listener = bind(addr).await?;
    let local = listener.local_addr()?;
    let node = Node::new(agent_id, config, scheme);
    node.set_hub(true);
    node.set_listen_url(format!("{scheme}://{local}{}", opts.path));
    info!(%local, path = %opts.path, agent = %node.agent_id(), "{scheme} listener up");
    let slots = Arc::new(Semaphore::new(opts.max_connections.max(1)));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let opts = Arc::new(opts);
    node.spawn_accept_loop(WsAcceptor(listener), move |hub, (stream, remote)| {
        let _ = stream.set_nodelay(true);
        let timeout = hub.config().connection_timeout();
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Over the limit: answer 503 if few others are waiting for theirs, else just close.
            let Ok(permit) = refusing.clone().try_acquire_owned() else { return };
            warn!(%remote, "WebSocket connection limit reached; refusing");
            tokio::spawn(async move {
                let _permit = permit;
                let mut stream = stream;
                let _ = read_head(&mut stream, timeout.min(Duration::from_secs(2))).await;
                let refusal = Refusal { status: 503, reason: "connection limit reached".into() };
                refuse(&mut stream, &refusal).await;
            });
            return;
        };
        let (hub, opts, tls) = (hub.clone(), opts.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => upgrade_and_accept(hub, stream, remote, opts, slot, None).await,
                Some(acceptor) => match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let fp = s
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .map(|c| cert_fingerprint(c));
                        upgrade_and_accept(hub, s, remote, opts, slot, fp).await
                    }
                    Ok(Err(e)) => warn!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => warn!(%remote, "TLS handshake timed out"),
                },
            }
        });
    });
    Ok(node)
}

/// Reads and checks the upgrade request, completes the upgrade and hands the link to the hub.
async fn upgrade_and_accept<S>(
    hub: Node,
    mut stream: S,
    remote: SocketAddr,
    opts: Arc<WsOptions>,
    slot: OwnedSemaphorePermit,
    client_cert: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let timeout = hub.config().connection_timeout();
    let head = match read_head(&mut stream, timeout).await {
        Ok(h) => h,
        Err(r) => {
            warn!(%remote, status = r.status, reason = %r.reason, "WebSocket upgrade refused");
            refuse(&mut stream, &r).await;
            return;
        }
    };
    let upgrade = match check(&head, &opts) {
        Ok(u) => u,
        Err(r) => {
            warn!(%remote, status = r.status, reason = %r.reason, "WebSocket upgrade refused");
            refuse(&mut stream, &r).await;
            return;
        }
    };
    let cfg = hub.config().clone();
    // tungstenite's callback signature fixes the error type (an HTTP response).
    #[allow(clippy::result_large_err)]
    let add_subprotocol = |_: &_, mut resp: Response<()>| {
        resp.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
        Ok(resp)
    };
    let ws = tokio_tungstenite::accept_hdr_async_with_config(
        Replay::new(head, stream),
        add_subprotocol,
        Some(ws_config(cfg.max_message_size)),
    );
    let ws = match tokio::time::timeout(timeout, ws).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => {
            warn!(%remote, error = %e, "WebSocket upgrade failed");
            return;
        }
        Err(_) => {
            warn!(%remote, "WebSocket upgrade timed out");
            return;
        }
    };
    debug!(%remote, path = %upgrade.path, "WebSocket upgraded");
    let mut info = PeerInfo {
        transport: hub.backend().into(),
        remote_addr: Some(remote.to_string()),
        ..PeerInfo::default()
    };
    info.attributes.insert(PATH_ATTR.into(), upgrade.path);
    if let Some(o) = upgrade.origin {
        info.attributes.insert(ORIGIN_ATTR.into(), o);
    }
    if let Some(t) = upgrade.token {
        info.attributes.insert(TOKEN_ATTR.into(), t);
    }
    if let Some(fp) = client_cert {
        info.attributes.insert(CLIENT_CERT_SHA256.into(), fp);
    }
    hub.accept_link(ws_link(
        ws,
        Role::Server,
        cfg.max_message_size,
        cfg.compression_threshold,
        opts.ping_interval,
        Some(slot),
        info,
    ));
}

/// A dialed byte stream: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Conn {
    /// `ws://`
    Plain(TcpStream),
    /// `wss://`
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// A dialed WebSocket link, before any handshake: for tests and tools that speak the wire
/// protocol themselves.
pub type ClientLink = Link<WsTx<Conn>, WsRx<Conn>>;

impl AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Dials `url` and completes the WebSocket upgrade; returns the link without the protocol
/// handshake (the engine, or a test speaking the wire protocol, does that).
pub async fn dial_link(
    url: &str,
    config: &TransportConfig,
    opts: &WsOptions,
) -> Result<ClientLink, TransportError> {
    let target = Target::parse(url)?;
    let tls = tls_dial(&target, config)?;
    dial_parsed(url, &target, tls, config, opts).await
}

type TlsDial = Option<(TlsConnector, ServerName<'static>)>;

fn tls_dial(target: &Target, config: &TransportConfig) -> Result<TlsDial, TransportError> {
    if !target.secure {
        return Ok(None);
    }
    let connector = TlsConnector::from(client_config(&config.tls)?);
    Ok(Some((connector, server_name_for(&config.tls, &target.authority)?)))
}

async fn dial_parsed(
    url: &str,
    target: &Target,
    tls: TlsDial,
    config: &TransportConfig,
    opts: &WsOptions,
) -> Result<ClientLink, TransportError> {
    let scheme = if target.secure { WSS_SCHEME } else { WS_SCHEME };
    let max = config.max_message_size;
    let dial = async {
        let tcp = TcpStream::connect(&target.authority).await.map_err(|e| {
            TransportError::ConnectionError(format!("cannot connect to {}: {e}", target.authority))
        })?;
        hivewire_core::net::refuse_self_connection(&tcp, &target.authority)?;
        let _ = tcp.set_nodelay(true);
        let remote = tcp.peer_addr().ok();
        let conn = match tls {
            None => Conn::Plain(tcp),
            Some((connector, name)) => {
                Conn::Tls(Box::new(connector.connect(name, tcp).await.map_err(|e| {
                    TransportError::ConnectionError(format!("TLS handshake with {url} failed: {e}"))
                })?))
            }
        };
        let mut request = url
            .into_client_request()
            .map_err(|e| TransportError::InvalidUrl { url: url.to_string(), reason: e.to_string() })?;
        request.headers_mut().insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(SUBPROTOCOL));
        if let Some(token) = &opts.bearer_token {
            let value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| {
                TransportError::InvalidUrl { url: url.to_string(), reason: format!("bearer token: {e}") }
            })?;
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let (ws, response) = tokio_tungstenite::client_async_with_config(request, conn, Some(ws_config(max)))
            .await
            .map_err(|e| upgrade_error(url, e))?;
        let chosen = response.headers().get(header::SEC_WEBSOCKET_PROTOCOL);
        if chosen.and_then(|v| v.to_str().ok()) != Some(SUBPROTOCOL) {
            return Err(TransportError::ConnectionError(format!(
                "{url} did not accept the subprotocol {SUBPROTOCOL}"
            )));
        }
        Ok((ws, remote))
    };
    let (ws, remote) = tokio::time::timeout(config.connection_timeout(), dial)
        .await
        .map_err(|_| TransportError::Timeout)??;
    let info = PeerInfo {
        transport: scheme.into(),
        remote_addr: remote.map(|r| r.to_string()),
        ..PeerInfo::default()
    };
    Ok(ws_link(ws, Role::Client, max, config.compression_threshold, opts.ping_interval, None, info))
}

async fn connect(
    url: &str,
    agent_id: impl Into<AgentId>,
    config: TransportConfig,
    opts: WsOptions,
) -> Result<Node, TransportError> {
    let target = Target::parse(url)?;
    let scheme = if target.secure { WSS_SCHEME } else { WS_SCHEME };
    let tls = tls_dial(&target, &config)?;
    let dial_cfg = config.clone();
    let url = url.to_string();
    Node::dial(agent_id, config, scheme, move || {
        let (url, target, tls, opts, cfg) =
            (url.clone(), target.clone(), tls.clone(), opts.clone(), dial_cfg.clone());
        async move { dial_parsed(&url, &target, tls, &cfg, &opts).await }
    })
    .await
}

/// A refused upgrade names the HTTP status and the listener's reason.
fn upgrade_error(url: &str, e: WsError) -> TransportError {
    match e {
        WsError::Http(resp) => {
            let body = resp.body().as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            TransportError::ConnectionError(format!(
                "WebSocket upgrade refused by {url}: HTTP {}: {}",
                resp.status(),
                body.trim()
            ))
        }
        other => match ws_error(other) {
            TransportError::ConnectionError(m) => {
                TransportError::ConnectionError(format!("WebSocket upgrade with {url} failed: {m}"))
            }
            e => e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_paths() {
        let t = Target::parse("ws://127.0.0.1:9000/hw?token=x").unwrap();
        assert_eq!(t, Target { secure: false, authority: "127.0.0.1:9000".into(), path: "/hw".into() });
        let t = Target::parse("wss://localhost").unwrap();
        assert_eq!(t, Target { secure: true, authority: "localhost:443".into(), path: "/".into() });
        let t = Target::parse("ws://[::1]:1/").unwrap();
        assert_eq!(t.authority, "[::1]:1");
        assert!(matches!(Target::parse("http://x/"), Err(TransportError::InvalidUrl { .. })));
        assert!(matches!(Target::parse("ws//x"), Err(TransportError::InvalidUrl { .. })));
    }
}

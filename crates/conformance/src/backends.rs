//! The factories of the backends built into this workspace.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hivewire_core::link::{FramedRx, FramedTx};
use hivewire_core::{framed_link, LinkRx, LinkTx, Message, Node, PeerInfo, TransportConfig, TransportError};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

use crate::{BackendFactory, BoxFuture, Capabilities, RawPeer};

fn unique(tag: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("conformance-{tag}-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

struct LinkPeer<T, R> {
    tx: T,
    rx: R,
}

impl<T: LinkTx, R: LinkRx> RawPeer for LinkPeer<T, R> {
    fn send(&mut self, msg: Message) -> BoxFuture<'_, Result<(), TransportError>> {
        Box::pin(async move { self.tx.send_batch(&mut vec![msg]).await })
    }
    fn recv(&mut self) -> BoxFuture<'_, Result<Option<Message>, TransportError>> {
        Box::pin(self.rx.recv())
    }
}

/// The in-process backend.
#[cfg(feature = "inproc")]
#[derive(Debug, Clone, Copy, Default)]
pub struct InprocBackend;

#[cfg(feature = "inproc")]
impl BackendFactory for InprocBackend {
    fn name(&self) -> &'static str {
        "inproc"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reliable: true,
            ordered: true,
            max_message_size: usize::MAX,
            cross_process: false,
            carries_bytes: false,
            redials: true,
        }
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let name = unique("inproc");
            let node = hivewire_inproc::InProcessTransport::listen(&name, agent_id, config).await?;
            Ok((node, name))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move { hivewire_inproc::InProcessTransport::listen(&address, agent_id, config).await })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(
            async move { hivewire_inproc::InProcessTransport::connect(&address, agent_id, config).await },
        )
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let link = hivewire_inproc::InProcessTransport::dial_link(&address, PeerInfo::default()).await?;
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// The engine and codec over an in-memory byte stream (`tokio::io::duplex`): every message is
/// framed, optionally compressed, and parsed back, exactly as on a socket.
#[derive(Debug, Default)]
pub struct DuplexBackend {
    hubs: Mutex<HashMap<String, Node>>,
}

/// Bytes buffered in each direction of a duplex stream.
const DUPLEX_BUFFER: usize = 256 * 1024;

type DuplexTx = FramedTx<WriteHalf<DuplexStream>>;
type DuplexRx = FramedRx<ReadHalf<DuplexStream>>;

impl DuplexBackend {
    fn hub(&self, address: &str) -> Result<Node, TransportError> {
        let hubs = self.hubs.lock().unwrap_or_else(|p| p.into_inner());
        match hubs.get(address) {
            Some(n) if !n.is_closed() => Ok(n.clone()),
            _ => {
                Err(TransportError::ConnectionError(format!("connection refused: no duplex hub {address:?}")))
            }
        }
    }

    fn pair(&self, hub: &Node, config: &TransportConfig, address: &str) -> (DuplexTx, DuplexRx) {
        let (a, b) = tokio::io::duplex(DUPLEX_BUFFER);
        let hub_cfg = hub.config();
        let info = PeerInfo {
            transport: "duplex".into(),
            remote_addr: Some(address.to_string()),
            ..PeerInfo::default()
        };
        hub.accept_link(framed_link(
            a,
            hub_cfg.max_message_size,
            hub_cfg.compression_threshold,
            info.clone(),
        ));
        let link = framed_link(b, config.max_message_size, config.compression_threshold, info);
        (link.tx, link.rx)
    }
}

impl BackendFactory for DuplexBackend {
    fn name(&self) -> &'static str {
        "duplex"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            reliable: true,
            ordered: true,
            max_message_size: u32::MAX as usize - hivewire_codec_allowance(),
            cross_process: false,
            carries_bytes: true,
            redials: false,
        }
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let name = unique("duplex");
            let node = Node::new(agent_id, config, "duplex");
            node.set_hub(true);
            self.hubs.lock().unwrap_or_else(|p| p.into_inner()).insert(name.clone(), node.clone());
            Ok((node, name))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            if self.hub(&address).is_ok() {
                return Err(TransportError::ConnectionError(format!("address in use: {address}")));
            }
            let node = Node::new(agent_id, config, "duplex");
            node.set_hub(true);
            self.hubs.lock().unwrap_or_else(|p| p.into_inner()).insert(address, node.clone());
            Ok(node)
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            let hub = self.hub(&address)?;
            let (tx, rx) = self.pair(&hub, &config, &address);
            let node = Node::new(agent_id, config, "duplex");
            node.connect_link(hivewire_core::Link::new(tx, rx, PeerInfo::default())).await?;
            Ok(node)
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let hub = self.hub(&address)?;
            let cfg = TransportConfig::default();
            let (tx, rx) = self.pair(&hub, &cfg, &address);
            Ok(Box::new(LinkPeer { tx, rx }) as Box<dyn RawPeer>)
        })
    }
}

fn hivewire_codec_allowance() -> usize {
    64 * 1024
}

/// What every socket backend (tcp, tls, uds) declares.
#[cfg(any(feature = "tcp", feature = "tls", feature = "uds"))]
const SOCKET_CAPABILITIES: Capabilities = Capabilities {
    reliable: true,
    ordered: true,
    max_message_size: u32::MAX as usize - 64 * 1024,
    cross_process: true,
    carries_bytes: true,
    redials: true,
};

/// The TCP backend, on loopback with ephemeral ports.
#[cfg(feature = "tcp")]
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpBackend;

#[cfg(feature = "tcp")]
impl BackendFactory for TcpBackend {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn capabilities(&self) -> Capabilities {
        SOCKET_CAPABILITIES
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let node =
                hivewire_tcp::TcpTransport::listen("127.0.0.1:0", agent_id, config, Default::default())
                    .await?;
            let url = node.listen_url().unwrap_or_default();
            Ok((node, url.trim_start_matches("tcp://").to_string()))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_tcp::TcpTransport::listen(&address, agent_id, config, Default::default()).await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_tcp::TcpTransport::connect(&address, agent_id, config, Default::default()).await
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&address).await?;
            stream.set_nodelay(true)?;
            let cfg = TransportConfig::default();
            let link =
                framed_link(stream, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default());
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// The Unix-socket backend, with socket files in a fresh temporary directory.
#[cfg(feature = "uds")]
#[derive(Debug)]
pub struct UdsBackend {
    dir: std::path::PathBuf,
}

#[cfg(feature = "uds")]
impl Default for UdsBackend {
    fn default() -> Self {
        UdsBackend { dir: std::env::temp_dir().join(unique("uds")) }
    }
}

#[cfg(feature = "uds")]
impl Drop for UdsBackend {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(feature = "uds")]
impl BackendFactory for UdsBackend {
    fn name(&self) -> &'static str {
        "uds"
    }

    fn capabilities(&self) -> Capabilities {
        SOCKET_CAPABILITIES
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            std::fs::create_dir_all(&self.dir)?;
            let path = self.dir.join(format!("{}.sock", unique("hub")));
            let path = path.to_string_lossy().into_owned();
            let node =
                hivewire_uds::UdsTransport::listen(&path, agent_id, config, Default::default()).await?;
            Ok((node, path))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_uds::UdsTransport::listen(&address, agent_id, config, Default::default()).await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move { hivewire_uds::UdsTransport::connect(&address, agent_id, config).await })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let stream = tokio::net::UnixStream::connect(&address).await?;
            let cfg = TransportConfig::default();
            let link =
                framed_link(stream, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default());
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// TLS over TCP, on loopback, with a test PKI generated for the run.
#[cfg(feature = "tls")]
#[derive(Debug)]
pub struct TlsBackend {
    pki: hivewire_tcp::test_pki::TestPki,
}

#[cfg(feature = "tls")]
impl TlsBackend {
    /// A backend with freshly generated certificates.
    pub fn new() -> Result<Self, String> {
        Ok(TlsBackend { pki: hivewire_tcp::test_pki::generate().map_err(|e| e.to_string())? })
    }

    fn server(&self, config: TransportConfig) -> TransportConfig {
        TransportConfig { tls: self.pki.server_tls(), ..config }
    }

    fn client(&self, config: TransportConfig) -> TransportConfig {
        TransportConfig { tls: self.pki.client_tls(), ..config }
    }
}

#[cfg(feature = "tls")]
impl BackendFactory for TlsBackend {
    fn name(&self) -> &'static str {
        "tls"
    }

    fn capabilities(&self) -> Capabilities {
        SOCKET_CAPABILITIES
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let node = hivewire_tcp::TlsTransport::listen(
                "127.0.0.1:0",
                agent_id,
                self.server(config),
                Default::default(),
            )
            .await?;
            let url = node.listen_url().unwrap_or_default();
            let port = url.rsplit(':').next().unwrap_or_default().to_string();
            Ok((node, format!("localhost:{port}")))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.replace("localhost", "127.0.0.1"), agent_id.to_string());
        Box::pin(async move {
            hivewire_tcp::TlsTransport::listen(&address, agent_id, self.server(config), Default::default())
                .await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_tcp::TlsTransport::connect(&address, agent_id, self.client(config), Default::default())
                .await
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let cfg = self.client(TransportConfig::default());
            let connector = tokio_rustls::TlsConnector::from(hivewire_tcp::client_config(&cfg.tls)?);
            let tcp = tokio::net::TcpStream::connect(address.replace("localhost", "127.0.0.1")).await?;
            let name = rustls_pki_types::ServerName::try_from("localhost")
                .map_err(|e| TransportError::ConnectionError(e.to_string()))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| TransportError::ConnectionError(format!("TLS handshake failed: {e}")))?;
            let link = framed_link(tls, cfg.max_message_size, cfg.compression_threshold, PeerInfo::default());
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// WebSocket, `ws://` or (with a test PKI generated for the run) `wss://`, on loopback.
#[cfg(feature = "ws")]
#[derive(Debug)]
pub struct WsBackend {
    pki: Option<hivewire_core::test_pki::TestPki>,
}

#[cfg(feature = "ws")]
impl WsBackend {
    /// Plain `ws://`.
    pub fn plain() -> Self {
        WsBackend { pki: None }
    }

    /// `wss://` with freshly generated certificates.
    pub fn secure() -> Result<Self, String> {
        Ok(WsBackend { pki: Some(hivewire_core::test_pki::generate().map_err(|e| e.to_string())?) })
    }

    fn server(&self, config: TransportConfig) -> TransportConfig {
        match &self.pki {
            Some(pki) => TransportConfig { tls: pki.server_tls(), ..config },
            None => config,
        }
    }

    fn client(&self, config: TransportConfig) -> TransportConfig {
        match &self.pki {
            Some(pki) => TransportConfig { tls: pki.client_tls(), ..config },
            None => config,
        }
    }
}

#[cfg(feature = "ws")]
impl BackendFactory for WsBackend {
    fn name(&self) -> &'static str {
        if self.pki.is_some() {
            "wss"
        } else {
            "ws"
        }
    }

    fn capabilities(&self) -> Capabilities {
        SOCKET_CAPABILITIES
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        let url = format!("{}://127.0.0.1:0/hivewire", self.name());
        Box::pin(async move {
            let node = hivewire_ws::WebSocketTransport::listen_url(
                &url,
                agent_id,
                self.server(config),
                Default::default(),
            )
            .await?;
            // The certificate names `localhost`; dial by that name.
            let url = node.listen_url().unwrap_or_default().replace("127.0.0.1", "localhost");
            Ok((node, url))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (url, agent_id) = (address.replace("localhost", "127.0.0.1"), agent_id.to_string());
        Box::pin(async move {
            hivewire_ws::WebSocketTransport::listen_url(
                &url,
                agent_id,
                self.server(config),
                Default::default(),
            )
            .await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (url, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_ws::WebSocketTransport::connect(&url, agent_id, self.client(config), Default::default())
                .await
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let url = address.to_string();
        Box::pin(async move {
            let cfg = self.client(TransportConfig::default());
            let link = hivewire_ws::dial_link(&url, &cfg, &Default::default()).await?;
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// QUIC on loopback, with a test PKI generated for the run.
#[cfg(feature = "quic")]
#[derive(Debug)]
pub struct QuicBackend {
    pki: hivewire_core::test_pki::TestPki,
}

#[cfg(feature = "quic")]
impl QuicBackend {
    /// A backend with freshly generated certificates.
    pub fn new() -> Result<Self, String> {
        Ok(QuicBackend { pki: hivewire_core::test_pki::generate().map_err(|e| e.to_string())? })
    }

    fn server(&self, config: TransportConfig) -> TransportConfig {
        TransportConfig { tls: self.pki.server_tls(), ..config }
    }

    fn client(&self, config: TransportConfig) -> TransportConfig {
        TransportConfig { tls: self.pki.client_tls(), ..config }
    }
}

#[cfg(feature = "quic")]
impl BackendFactory for QuicBackend {
    fn name(&self) -> &'static str {
        "quic"
    }

    fn capabilities(&self) -> Capabilities {
        SOCKET_CAPABILITIES
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let node = hivewire_quic::QuicTransport::listen(
                "127.0.0.1:0",
                agent_id,
                self.server(config),
                Default::default(),
            )
            .await?;
            let url = node.listen_url().unwrap_or_default();
            let port = url.rsplit(':').next().unwrap_or_default().to_string();
            Ok((node, format!("localhost:{port}")))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.replace("localhost", "127.0.0.1"), agent_id.to_string());
        Box::pin(async move {
            hivewire_quic::QuicTransport::listen(&address, agent_id, self.server(config), Default::default())
                .await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_quic::QuicTransport::connect(&address, agent_id, self.client(config), Default::default())
                .await
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let cfg = self.client(TransportConfig::default());
            let link = hivewire_quic::dial_link(&address, &cfg, &Default::default()).await?;
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// UDP on loopback: declared unreliable and unordered, so the scenarios that need delivery or
/// order guarantees are skipped by that declaration; all others run.
#[cfg(feature = "udp")]
#[derive(Debug, Clone, Copy, Default)]
pub struct UdpBackend;

#[cfg(feature = "udp")]
impl BackendFactory for UdpBackend {
    fn name(&self) -> &'static str {
        "udp"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { reliable: false, ordered: false, ..SOCKET_CAPABILITIES }
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let node =
                hivewire_udp::UdpTransport::listen("127.0.0.1:0", agent_id, config, Default::default())
                    .await?;
            let url = node.listen_url().unwrap_or_default();
            Ok((node, url.trim_start_matches("udp://").to_string()))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_udp::UdpTransport::listen(&address, agent_id, config, Default::default()).await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            hivewire_udp::UdpTransport::connect(&address, agent_id, config, Default::default()).await
        })
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let link =
                hivewire_udp::dial_link(&address, &TransportConfig::default(), &Default::default()).await?;
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

/// Shared memory, with a unique name per hub (8 MiB rings, so 2 MiB messages fit one record).
#[cfg(feature = "shm")]
#[derive(Debug, Clone, Copy, Default)]
pub struct ShmBackend;

#[cfg(feature = "shm")]
const SHM_RING: usize = 8 << 20;

#[cfg(feature = "shm")]
impl BackendFactory for ShmBackend {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { max_message_size: hivewire_shm::max_payload_for_ring(SHM_RING), ..SOCKET_CAPABILITIES }
    }

    fn listen(
        &self,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<(Node, String), TransportError>> {
        let agent_id = agent_id.to_string();
        Box::pin(async move {
            let name = format!("hwconf-{}-{:x}", std::process::id(), fastrand_u64());
            let info = hivewire_shm::SharedMemoryInfo { ring_buffer_size: SHM_RING, ..Default::default() };
            let node = hivewire_shm::SharedMemoryTransport::listen(&name, agent_id, config, info).await?;
            Ok((node, name))
        })
    }

    fn listen_at(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(async move {
            let info = hivewire_shm::SharedMemoryInfo { ring_buffer_size: SHM_RING, ..Default::default() };
            hivewire_shm::SharedMemoryTransport::listen(&address, agent_id, config, info).await
        })
    }

    fn connect(
        &self,
        address: &str,
        agent_id: &str,
        config: TransportConfig,
    ) -> BoxFuture<'_, Result<Node, TransportError>> {
        let (address, agent_id) = (address.to_string(), agent_id.to_string());
        Box::pin(
            async move { hivewire_shm::SharedMemoryTransport::connect(&address, agent_id, config).await },
        )
    }

    fn raw_connect(&self, address: &str) -> BoxFuture<'_, Result<Box<dyn RawPeer>, TransportError>> {
        let address = address.to_string();
        Box::pin(async move {
            let link =
                hivewire_shm::SharedMemoryTransport::dial_link(&address, &TransportConfig::default()).await?;
            Ok(Box::new(LinkPeer { tx: link.tx, rx: link.rx }) as Box<dyn RawPeer>)
        })
    }
}

#[cfg(feature = "shm")]
fn fastrand_u64() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    let t =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ N.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

//! TLS over TCP (`tls://host:port`) with tokio-rustls: server certificates from PEM, CA
//! verification on by default, optional mutual TLS whose verified client identity reaches the
//! authenticator.

use std::sync::Arc;
use std::time::Duration;

use hivewire_core::tls::{
    cert_fingerprint, client_config, server_config, server_name_for, CLIENT_CERT_SHA256,
};
use hivewire_core::{framed_link, AgentId, Node, PeerInfo, TransportConfig, TransportError};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tracing::{info, warn};

use crate::{bind, configure, dial, TcpAcceptor, TcpOptions};

/// URL scheme of TLS over TCP.
pub const TLS_SCHEME: &str = "tls";

/// Constructors of TLS-over-TCP nodes; certificates come from `TransportConfig::tls`.
#[derive(Debug, Clone, Copy)]
pub struct TlsTransport;

impl TlsTransport {
    /// A hub listening for TLS on `addr` (`host:port`; port 0 picks a free one).
    pub async fn listen(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: TcpOptions,
    ) -> Result<Node, TransportError> {
        let acceptor = TlsAcceptor::from(server_config(&config.tls)?);
        let listener = bind(addr, &opts).await?;
        let local = listener.local_addr()?;
        let handshake_timeout = config.connection_timeout();
        // TLS handshakes run concurrently, at most one per allowed peer.
        let handshakes = Arc::new(Semaphore::new(config.max_peers.max(1)));
        let node = Node::new(agent_id, config, TLS_SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{TLS_SCHEME}://{local}"));
        info!(%local, agent = %node.agent_id(), "tls listener up");
        node.spawn_accept_loop(TcpAcceptor(listener), move |hub, (stream, remote)| {
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn!(%remote, "too many TLS handshakes in progress; dropping the connection");
                return;
            };
            if configure(&stream, &opts).is_err() {
                return;
            }
            let (acceptor, hub) = (acceptor.clone(), hub.clone());
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let mut info = PeerInfo {
                            transport: TLS_SCHEME.into(),
                            remote_addr: Some(remote.to_string()),
                            ..PeerInfo::default()
                        };
                        if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                            info.attributes
                                .insert(CLIENT_CERT_SHA256.into(), cert_fingerprint(cert.as_ref()));
                        }
                        let cfg = hub.config();
                        hub.accept_link(framed_link(
                            tls,
                            cfg.max_message_size,
                            cfg.compression_threshold,
                            info,
                        ));
                    }
                    Ok(Err(e)) => warn!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => warn!(%remote, "TLS handshake timed out"),
                }
            });
        });
        Ok(node)
    }

    /// An agent connected over TLS to the hub at `addr`; verifies the server certificate
    /// against `config.tls.ca_pem` and the host name (or `config.tls.server_name`). Redials
    /// when the connection drops.
    pub async fn connect(
        addr: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: TcpOptions,
    ) -> Result<Node, TransportError> {
        let connector = TlsConnector::from(client_config(&config.tls)?);
        let name = server_name_for(&config.tls, addr)?;
        let timeout: Duration = config.connection_timeout();
        let (max, threshold) = (config.max_message_size, config.compression_threshold);
        let addr = addr.to_string();
        Node::dial(agent_id, config, TLS_SCHEME, move || {
            let (addr, opts, connector, name) = (addr.clone(), opts.clone(), connector.clone(), name.clone());
            async move {
                let tcp: TcpStream = dial(&addr, &opts, timeout).await?;
                let remote = tcp.peer_addr().ok();
                let tls = match tokio::time::timeout(timeout, connector.connect(name, tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(TransportError::ConnectionError(format!(
                            "TLS handshake with {addr} failed: {e}"
                        )))
                    }
                    Err(_) => return Err(TransportError::Timeout),
                };
                let info = PeerInfo {
                    transport: TLS_SCHEME.into(),
                    remote_addr: remote.map(|r| r.to_string()),
                    ..PeerInfo::default()
                };
                Ok(framed_link(tls, max, threshold, info))
            }
        })
        .await
    }
}

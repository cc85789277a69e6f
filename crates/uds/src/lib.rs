//! hivewire's Unix-domain-socket backend: `unix:///path.sock`.
//!
//! * A socket file left by a dead process is replaced on listen; a live listener's socket is
//!   never taken over (`ConnectionError("address in use …")`); a path that exists and is not a
//!   socket is never touched.
//! * The socket file gets mode `0600` by default and is removed when the listener closes.
//! * The kernel's peer credentials (`pid`, `uid`, `gid`) are put in the `PeerInfo` attributes,
//!   where the authenticator sees them.
//!
//! ```
//! use hivewire_uds::{UdsOptions, UdsTransport};
//! use hivewire_core::TransportConfig;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), hivewire_core::TransportError> {
//! let dir = std::env::temp_dir().join(format!("hivewire-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let path = dir.join("hub.sock");
//! let path = path.to_str().expect("utf-8 path");
//! let hub = UdsTransport::listen(path, "hub", TransportConfig::default(), UdsOptions::default()).await?;
//! let agent = UdsTransport::connect(path, "agent", TransportConfig::default()).await?;
//! let creds = hub.peer_info("agent").expect("connected").attributes;
//! assert_eq!(creds.get("pid"), Some(&std::process::id().to_string()));
//! agent.close().await;
//! hub.close().await;
//! assert!(!std::path::Path::new(path).exists(), "socket file removed on close");
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::io::ErrorKind;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use hivewire_core::{framed_halves, Acceptor, AgentId, Node, PeerInfo, TransportConfig, TransportError};
use tokio::net::{UnixListener, UnixStream};
use tracing::info;

/// URL scheme of this backend.
pub const SCHEME: &str = "unix";

/// Unix-socket options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdsOptions {
    /// Permission bits of the socket file (default `0o600`: only the owner may connect).
    pub mode: u32,
}

impl Default for UdsOptions {
    fn default() -> Self {
        UdsOptions { mode: 0o600 }
    }
}

/// The stream's owned halves (no lock shared between the reader and the writer, unlike a
/// generic split) as a framed link.
fn uds_link(
    stream: UnixStream,
    max: usize,
    threshold: usize,
    info: PeerInfo,
) -> hivewire_core::Link<
    hivewire_core::FramedTx<tokio::net::unix::OwnedWriteHalf>,
    hivewire_core::FramedRx<tokio::net::unix::OwnedReadHalf>,
> {
    let (r, w) = stream.into_split();
    framed_halves(r, w, max, threshold, info)
}

fn peer_info(stream: &UnixStream, path: &Path) -> PeerInfo {
    let mut info = PeerInfo {
        transport: SCHEME.into(),
        remote_addr: Some(format!("{SCHEME}://{}", path.display())),
        ..PeerInfo::default()
    };
    if let Ok(cred) = stream.peer_cred() {
        if let Some(pid) = cred.pid() {
            info.attributes.insert("pid".into(), pid.to_string());
        }
        info.attributes.insert("uid".into(), cred.uid().to_string());
        info.attributes.insert("gid".into(), cred.gid().to_string());
    }
    info
}

/// Makes `path` free for a new listener: removes a stale socket (nobody accepts on it), refuses
/// a live one or anything that is not a socket.
fn clear_stale(path: &Path) -> Result<(), TransportError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if !meta.file_type().is_socket() {
        return Err(TransportError::ConnectionError(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(TransportError::ConnectionError(format!(
            "address in use: a live listener owns {}",
            path.display()
        ))),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing a stale socket left by a dead listener");
            std::fs::remove_file(path)?;
            Ok(())
        }
        Err(e) => Err(TransportError::ConnectionError(format!("cannot probe {}: {e}", path.display()))),
    }
}

/// Constructors of Unix-socket nodes.
#[derive(Debug, Clone, Copy)]
pub struct UdsTransport;

impl UdsTransport {
    /// A hub listening on the socket file `path`.
    pub async fn listen(
        path: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
        opts: UdsOptions,
    ) -> Result<Node, TransportError> {
        let path = PathBuf::from(path);
        clear_stale(&path)?;
        let listener = UnixListener::bind(&path).map_err(|e| {
            TransportError::ConnectionError(format!("cannot listen on {}: {e}", path.display()))
        })?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(opts.mode))?;
        // Remember which file is ours, so close() never removes a successor's socket.
        let ours = std::fs::metadata(&path).map(|m| (m.dev(), m.ino()))?;
        let node = Node::new(agent_id, config, SCHEME);
        node.set_hub(true);
        node.set_listen_url(format!("{SCHEME}://{}", path.display()));
        let cleanup = path.clone();
        node.on_close(move || {
            if std::fs::metadata(&cleanup).map(|m| (m.dev(), m.ino())).ok() == Some(ours) {
                let _ = std::fs::remove_file(&cleanup);
            }
        });
        info!(path = %path.display(), agent = %node.agent_id(), "unix listener up");
        node.spawn_accept_loop(UdsAcceptor(listener), move |node, stream| {
            let info = peer_info(&stream, &path);
            let cfg = node.config();
            node.accept_link(uds_link(stream, cfg.max_message_size, cfg.compression_threshold, info));
        });
        Ok(node)
    }

    /// An agent connected to the hub on the socket file `path`; returns after the handshake.
    /// If the connection drops later, the node redials (see `Node::connect_with_redial`).
    pub async fn connect(
        path: &str,
        agent_id: impl Into<AgentId>,
        config: TransportConfig,
    ) -> Result<Node, TransportError> {
        let p = PathBuf::from(path);
        let timeout = config.connection_timeout();
        let (max, threshold) = (config.max_message_size, config.compression_threshold);
        Node::dial(agent_id, config, SCHEME, move || {
            let p = p.clone();
            async move {
                let stream = match tokio::time::timeout(timeout, UnixStream::connect(&p)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        return Err(TransportError::ConnectionError(format!(
                            "cannot connect to {}: {e}",
                            p.display()
                        )))
                    }
                    Err(_) => return Err(TransportError::Timeout),
                };
                let info = peer_info(&stream, &p);
                Ok(uds_link(stream, max, threshold, info))
            }
        })
        .await
    }
}

/// A bound Unix listener as the engine's [`Acceptor`].
struct UdsAcceptor(UnixListener);

impl Acceptor for UdsAcceptor {
    type Conn = UnixStream;
    async fn accept(&mut self) -> std::io::Result<Option<UnixStream>> {
        self.0.accept().await.map(|(s, _)| Some(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(dir: &tempfile::TempDir, name: &str) -> String {
        dir.path().join(name).to_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn stale_socket_is_replaced_live_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock(&dir, "hub.sock");
        // A dead process's socket: bound, never accepted on, listener gone, file left behind.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(Path::new(&path).exists());
        let hub = UdsTransport::listen(&path, "hub", TransportConfig::default(), UdsOptions::default())
            .await
            .unwrap();
        let second =
            UdsTransport::listen(&path, "hub2", TransportConfig::default(), UdsOptions::default()).await;
        assert!(
            matches!(second, Err(TransportError::ConnectionError(ref m)) if m.contains("address in use")),
            "{second:?}"
        );
        // The live hub still works.
        let a = UdsTransport::connect(&path, "a", TransportConfig::default()).await.unwrap();
        assert_eq!(a.peers().len(), 1);
        a.close().await;
        hub.close().await;
        assert!(!Path::new(&path).exists(), "socket file must be removed on close");
    }

    #[tokio::test]
    async fn a_regular_file_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock(&dir, "not-a-socket");
        std::fs::write(&path, b"precious").unwrap();
        let r = UdsTransport::listen(&path, "hub", TransportConfig::default(), UdsOptions::default()).await;
        assert!(
            matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("not a socket")),
            "{r:?}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }

    #[tokio::test]
    async fn mode_is_applied_and_credentials_reach_the_authenticator() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock(&dir, "auth.sock");
        let me = std::fs::metadata(dir.path()).unwrap().uid().to_string();
        let want = me.clone();
        let cfg = TransportConfig::default().with_authenticator(
            move |_: &hivewire_core::HelloInfo<'_>, p: &PeerInfo| {
                if p.attributes.get("uid") == Some(&want) && p.attributes.contains_key("pid") {
                    Ok(())
                } else {
                    Err(format!("unexpected credentials {:?}", p.attributes))
                }
            },
        );
        let hub = UdsTransport::listen(&path, "hub", cfg, UdsOptions { mode: 0o640 }).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o640);
        let a = UdsTransport::connect(&path, "a", TransportConfig::default()).await.unwrap();
        let info = hub.peer_info("a").unwrap();
        assert_eq!(info.attributes.get("uid"), Some(&me));
        assert_eq!(info.attributes.get("pid"), Some(&std::process::id().to_string()));
        a.close().await;
        hub.close().await;
    }

    #[tokio::test]
    async fn default_mode_is_owner_only_and_missing_socket_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = sock(&dir, "m.sock");
        let hub = UdsTransport::listen(&path, "hub", TransportConfig::default(), UdsOptions::default())
            .await
            .unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        hub.close().await;
        let r = UdsTransport::connect(&path, "a", TransportConfig::default()).await;
        assert!(matches!(r, Err(TransportError::ConnectionError(_))), "{r:?}");
    }
}

//! Socket checks shared by the backends that dial TCP.

use tokio::net::TcpStream;

use crate::TransportError;

/// Refuses a TCP connection that is connected to itself.
///
/// A dialer that redials a loopback port in the ephemeral range while nothing listens there
/// can be given that very port as its own local port. TCP's simultaneous open then connects
/// the socket to itself. The connection would hold the port, so a listener restarting on it
/// fails with `AddrInUse`: the likely cause of one failure of the conformance suite's
/// reconnect scenario over `tls://`. The check costs two `getsockname`-style calls per dial.
pub fn refuse_self_connection(s: &TcpStream, target: &str) -> Result<(), TransportError> {
    match (s.local_addr(), s.peer_addr()) {
        (Ok(local), Ok(peer)) if local == peer => Err(TransportError::ConnectionError(format!(
            "cannot connect to {target}: the socket connected to itself ({local}); nothing listens there"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sockets whose connect is started from a chosen local port: bound to `port`, then
    /// connected to `to` (a socket connected to its own address opens simultaneously with
    /// itself).
    fn connect_from(port: u16, to: std::net::SocketAddr) -> std::io::Result<std::net::TcpStream> {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.set_reuse_address(true)?;
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
        s.connect(&to.into())?;
        Ok(s.into())
    }

    #[tokio::test]
    async fn a_socket_connected_to_itself_is_refused_and_a_real_connection_passes() {
        // A free loopback port: bound once, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let me = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let own = connect_from(port, me).expect("a self-connection on Linux loopback");
        own.set_nonblocking(true).unwrap();
        let own = TcpStream::from_std(own).unwrap();
        assert_eq!(own.local_addr().unwrap(), own.peer_addr().unwrap());
        match refuse_self_connection(&own, &me.to_string()) {
            Err(TransportError::ConnectionError(m)) => assert!(m.contains("connected to itself"), "{m}"),
            other => panic!("a self-connection passed: {other:?}"),
        }
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let real = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        assert!(refuse_self_connection(&real, "listener").is_ok());
    }
}

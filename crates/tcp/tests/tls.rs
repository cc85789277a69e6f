//! TLS over TCP with certificates generated in the test: a valid chain connects; wrong host
//! name, untrusted CA, expired certificate and a missing client certificate under mutual TLS
//! each fail with a clear error on the dialing side, and the listener keeps serving.

use hivewire_core::{Message, TlsConfig, TransportConfig, TransportError};
use hivewire_tcp::test_pki::{generate, Pair, TestPki};
use hivewire_tcp::{TcpOptions, TlsTransport, CLIENT_CERT_SHA256};

fn server_cfg(pair: &Pair) -> TransportConfig {
    TransportConfig {
        tls: TlsConfig {
            cert_chain_pem: Some(pair.cert_pem.clone().into_bytes()),
            key_pem: Some(pair.key_pem.clone().into_bytes()),
            ..TlsConfig::default()
        },
        ..TransportConfig::default()
    }
}

fn client_cfg(pki: &TestPki) -> TransportConfig {
    TransportConfig {
        tls: TlsConfig { ca_pem: Some(pki.ca_pem.clone().into_bytes()), ..TlsConfig::default() },
        ..TransportConfig::default()
    }
}

async fn listen(cfg: TransportConfig) -> (hivewire_core::Node, u16) {
    let hub = TlsTransport::listen("127.0.0.1:0", "hub", cfg, TcpOptions::default()).await.unwrap();
    let port = hub.listen_url().unwrap().rsplit(':').next().unwrap().parse().unwrap();
    (hub, port)
}

fn handshake_error(r: &Result<hivewire_core::Node, TransportError>) -> String {
    match r {
        Err(TransportError::ConnectionError(m)) => m.clone(),
        other => panic!("expected a TLS ConnectionError, got {other:?}"),
    }
}

#[tokio::test]
async fn valid_chain_connects_and_carries_messages() {
    let pki = generate().unwrap();
    let (hub, port) = listen(server_cfg(&pki.server)).await;
    let c = TlsTransport::connect(&format!("localhost:{port}"), "c", client_cfg(&pki), TcpOptions::default())
        .await
        .unwrap();
    c.send("hub", Message::event("c", "t", &"over tls").unwrap()).await.unwrap();
    let (from, m) = hub.receive().await.unwrap();
    assert_eq!(from.as_str(), "c");
    assert_eq!(m.payload_as::<String>().unwrap(), "over tls");
    assert_eq!(hub.peer_info("c").unwrap().transport, "tls");
    c.close().await;
    hub.close().await;
}

#[tokio::test]
async fn wrong_host_name_fails_on_the_dialer() {
    let pki = generate().unwrap();
    let (hub, port) = listen(server_cfg(&pki.wrong_name)).await;
    let r = TlsTransport::connect(&format!("localhost:{port}"), "c", client_cfg(&pki), TcpOptions::default())
        .await;
    let m = handshake_error(&r);
    assert!(m.contains("TLS handshake") && m.to_lowercase().contains("name"), "{m}");
    hub.close().await;
}

#[tokio::test]
async fn untrusted_ca_fails_on_the_dialer() {
    let pki = generate().unwrap();
    let (hub, port) = listen(server_cfg(&pki.untrusted)).await;
    let r = TlsTransport::connect(&format!("localhost:{port}"), "c", client_cfg(&pki), TcpOptions::default())
        .await;
    let m = handshake_error(&r);
    assert!(m.contains("TLS handshake") && m.to_lowercase().contains("issuer"), "{m}");
    // The listener still serves a correctly configured client? Not with this certificate, but
    // the explicit, named opt-out of verification connects.
    let mut insecure = client_cfg(&pki);
    insecure.tls.dangerous_accept_any_server_certificate = true;
    let c = TlsTransport::connect(&format!("localhost:{port}"), "c", insecure, TcpOptions::default())
        .await
        .unwrap();
    assert_eq!(c.peers().len(), 1);
    c.close().await;
    hub.close().await;
}

#[tokio::test]
async fn expired_certificate_fails_on_the_dialer() {
    let pki = generate().unwrap();
    let (hub, port) = listen(server_cfg(&pki.expired)).await;
    let r = TlsTransport::connect(&format!("localhost:{port}"), "c", client_cfg(&pki), TcpOptions::default())
        .await;
    let m = handshake_error(&r);
    assert!(m.contains("TLS handshake") && m.to_lowercase().contains("expired"), "{m}");
    hub.close().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_and_shows_its_identity() {
    let pki = generate().unwrap();
    let mut cfg = server_cfg(&pki.server);
    cfg.tls.ca_pem = Some(pki.ca_pem.clone().into_bytes());
    cfg.tls.require_client_cert = true;
    let (hub, port) = listen(cfg).await;
    let addr = format!("localhost:{port}");
    // Without a client certificate: refused. (TLS 1.3 reports the refusal after the
    // client's handshake completes, so it shows as a handshake or a link failure.)
    let r = TlsTransport::connect(&addr, "anon", client_cfg(&pki), TcpOptions::default()).await;
    assert!(r.is_err(), "a client without a certificate was admitted");
    assert!(hub.peers().is_empty());
    // With one: admitted, and the authenticator-visible identity is its fingerprint.
    let mut with_cert = client_cfg(&pki);
    with_cert.tls.client_cert_pem = Some(pki.client.cert_pem.clone().into_bytes());
    with_cert.tls.client_key_pem = Some(pki.client.key_pem.clone().into_bytes());
    let c = TlsTransport::connect(&addr, "known", with_cert, TcpOptions::default()).await.unwrap();
    let info = hub.peer_info("known").unwrap();
    let fp = info.attributes.get(CLIENT_CERT_SHA256).expect("client identity");
    assert_eq!(fp.len(), 64, "{fp}");
    c.close().await;
    hub.close().await;
}

#[tokio::test]
async fn missing_material_is_a_clear_configuration_error() {
    let r =
        TlsTransport::listen("127.0.0.1:0", "hub", TransportConfig::default(), TcpOptions::default()).await;
    assert!(
        matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("cert_chain_pem")),
        "{r:?}"
    );
    let r =
        TlsTransport::connect("localhost:1", "c", TransportConfig::default(), TcpOptions::default()).await;
    assert!(matches!(r, Err(TransportError::ConnectionError(ref m)) if m.contains("ca_pem")), "{r:?}");
}

#[tokio::test]
async fn a_direct_write_that_tls_cannot_flush_is_started_and_finished_by_an_empty_batch() {
    use hivewire_core::{framed_halves, LinkRx, LinkTx, PeerInfo, TrySend};
    use std::time::Duration;
    let pki = generate().unwrap();
    let server = hivewire_tcp::server_config(&server_cfg(&pki.server).tls).unwrap();
    let client = hivewire_tcp::client_config(&client_cfg(&pki).tls).unwrap();
    // A 1 KiB pipe: the handshake passes through it, and then a TLS record larger than what
    // is left of it stays in rustls until the reader drains the pipe.
    let (c, s) = tokio::io::duplex(1024);
    let name = hivewire_core::tls::server_name_for(&client_cfg(&pki).tls, "localhost:1").unwrap();
    let (c, s) = tokio::join!(
        tokio_rustls::TlsConnector::from(client).connect(name, c),
        tokio_rustls::TlsAcceptor::from(server).accept(s)
    );
    let (c, s) = (c.expect("client handshake"), s.expect("server handshake"));
    let (_cr, cw) = tokio::io::split(c);
    let (sr, _sw) = tokio::io::split(s);
    let mut tx = framed_halves(tokio::io::empty(), cw, 1 << 20, usize::MAX, PeerInfo::default()).tx;
    let mut rx = framed_halves(sr, tokio::io::sink(), 1 << 20, usize::MAX, PeerInfo::default()).rx;
    let event = |tag: u8, len: usize| {
        Message::new("a", hivewire_core::MessageType::Event { topic: "t".into() })
            .with_payload_bytes(bytes::Bytes::from(vec![tag; len]))
    };
    let (small, big, after) = (event(1, 100), event(2, 3000), event(3, 100));
    assert!(
        matches!(hivewire_core::try_send_once(&mut tx, &small).await, TrySend::Sent),
        "a small record fits"
    );
    // rustls takes the whole plaintext, but its records do not fit the pipe: the flush is
    // what cannot finish.
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &big).await, TrySend::Started));
    // The engine finishes a started write before it tries another (it holds the link
    // meanwhile); tried anyway, the next message queues behind the unflushed records in
    // rustls, not ahead of them.
    assert!(
        !matches!(hivewire_core::try_send_once(&mut tx, &after).await, TrySend::Sent),
        "flushed past a full pipe"
    );
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(rx.recv().await.unwrap().expect("a message"));
        }
        got
    });
    // The engine finishes a started write with an empty batch.
    tokio::time::timeout(Duration::from_secs(10), tx.send_batch(&mut Vec::new()))
        .await
        .expect("the started writes finish once the reader drains the pipe")
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), reader).await.unwrap().unwrap();
    assert_eq!(got, vec![small, big, after]);
}

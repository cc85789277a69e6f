//! Hostile and careless clients against a real WebSocket listener on loopback. In every test a
//! well-behaved agent stays connected throughout and must still get answers at the end.

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hivewire_core::test_pki::{generate, TestPki};
use hivewire_core::{Node, TransportConfig, TransportError};
use hivewire_ws::{WebSocketTransport, WsMode, WsOptions, PATH_ATTR, SUBPROTOCOL, TOKEN_ATTR};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

const WAIT: Duration = Duration::from_secs(10);

fn cfg() -> TransportConfig {
    TransportConfig { connection_timeout_ms: 2_000, ..TransportConfig::default() }
}

async fn hub_with(opts: WsOptions, config: TransportConfig) -> (Node, String) {
    let hub = WebSocketTransport::with_options(
        WsMode::Server { bind_addr: "127.0.0.1:0".into() },
        "hub",
        config,
        opts,
    )
    .await
    .expect("listen");
    let url = hub.listen_url().expect("url");
    (hub, url)
}

/// A hub that answers every request with its payload, plus one agent connected to it.
async fn hub_and_agent(opts: WsOptions, config: TransportConfig) -> (Node, String, Node) {
    let (hub, url) = hub_with(opts, config).await;
    let responder = hub.clone();
    tokio::spawn(async move {
        while let Ok((_, req)) = responder.receive().await {
            let _ = responder.respond_bytes(&req, req.payload.clone()).await;
        }
    });
    let agent =
        WebSocketTransport::new(WsMode::Client { url: url.clone() }, "good", cfg()).await.expect("agent");
    (hub, url, agent)
}

/// The well-behaved agent still gets its echo.
async fn still_served(agent: &Node) {
    let r = agent.request("hub", "echo", &"still here", WAIT).await.expect("the hub stopped serving others");
    assert_eq!(r.payload_as::<String>().unwrap(), "still here");
}

fn addr_of(url: &str) -> String {
    url.trim_start_matches("ws://").split('/').next().unwrap().to_string()
}

/// Sends `request` raw and returns the HTTP status line of the answer.
async fn raw_http(url: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr_of(url)).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("the listener never answered");
    let text = String::from_utf8_lossy(&out).to_string();
    text.lines().next().unwrap_or_default().to_string()
}

fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

type RawWs = WebSocketStream<TcpStream>;

/// A raw WebSocket client that offers the subprotocol and then does whatever the test says.
async fn raw_ws(url: &str) -> RawWs {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut().insert("Sec-WebSocket-Protocol", HeaderValue::from_static(SUBPROTOCOL));
    let tcp = TcpStream::connect(addr_of(url)).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("upgrade");
    assert_eq!(resp.headers().get("Sec-WebSocket-Protocol").unwrap(), SUBPROTOCOL);
    ws
}

/// Waits until the server closes `ws`; returns how long that took.
async fn closed_by_server(ws: &mut RawWs) -> Duration {
    let start = Instant::now();
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("the server never closed the link") {
            None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return start.elapsed(),
            Some(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn plain_http_get_gets_426() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let status = raw_http(&url, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 426 Upgrade Required");
    let status = raw_http(&url, "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    let status = raw_http(&url, "\x16\x03\x01 this is not http\r\n\r\n").await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn wrong_or_missing_subprotocol_gets_400() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let status = raw_http(&url, &upgrade_request("/", "Sec-WebSocket-Protocol: chat.v2\r\n")).await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let status = raw_http(&url, &upgrade_request("/", "")).await;
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    // With it, the same request is upgraded.
    let status =
        raw_http(&url, &upgrade_request("/", "Sec-WebSocket-Protocol: chat.v2, hivewire.v1\r\n")).await;
    assert_eq!(status, "HTTP/1.1 101 Switching Protocols");
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn one_path_only() {
    let opts = WsOptions { path: "/swarm".into(), ..WsOptions::default() };
    let (hub, url, agent) = hub_and_agent(opts, cfg()).await;
    assert!(url.ends_with("/swarm"), "{url}");
    let status = raw_http(&url, &upgrade_request("/other", "Sec-WebSocket-Protocol: hivewire.v1\r\n")).await;
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let info = hub.peer_info("good").unwrap();
    assert_eq!(info.attributes.get(PATH_ATTR).map(String::as_str), Some("/swarm"));
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn text_frames_close_only_that_link() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let mut ws = raw_ws(&url).await;
    ws.send(WsMessage::text("{\"hello\": true}")).await.unwrap();
    closed_by_server(&mut ws).await;
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn garbage_inside_a_binary_message_closes_only_that_link() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let mut ws = raw_ws(&url).await;
    ws.send(WsMessage::binary(b"HW\x01\x00\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1".to_vec())).await.unwrap();
    closed_by_server(&mut ws).await;
    // A frame header claiming 4 GiB inside a small message.
    let mut ws = raw_ws(&url).await;
    ws.send(WsMessage::binary(b"HW\x01\x00\xff\xff\xff\xff".to_vec())).await.unwrap();
    closed_by_server(&mut ws).await;
    // A message that ends inside a frame.
    let mut ws = raw_ws(&url).await;
    ws.send(WsMessage::binary(b"HW\x01\x00\x00\x00\x00\x40\x9b".to_vec())).await.unwrap();
    closed_by_server(&mut ws).await;
    still_served(&agent).await;
    assert_eq!(hub.peers().len(), 1);
    hub.close().await;
}

#[tokio::test]
async fn a_message_over_the_size_limit_closes_only_that_link() {
    let config = TransportConfig { max_message_size: 1024, ..cfg() };
    let (hub, url, _) = hub_and_agent(WsOptions::default(), config.clone()).await;
    // An agent with the same limit: its own sends past the limit fail before leaving it.
    let agent =
        WebSocketTransport::new(WsMode::Client { url: url.clone() }, "limited", config).await.unwrap();
    // The WebSocket limit is one batch (64 KiB) plus one frame of the largest body.
    let limit = hivewire_ws::BATCH_BYTES + 8 + 1024 + 64 * 1024;
    let mut ws = raw_ws(&url).await;
    ws.send(WsMessage::binary(vec![0u8; limit + 1])).await.unwrap();
    closed_by_server(&mut ws).await;
    // A payload at the hivewire limit still passes, one past it does not leave the sender.
    let r = agent.request("hub", "echo", &bytes_payload(1024 - 8), WAIT).await;
    assert!(r.is_ok(), "{r:?}");
    let too_big = agent.request("hub", "echo", &bytes_payload(2048), WAIT).await;
    assert!(matches!(too_big, Err(TransportError::MessageTooLarge { .. })), "{too_big:?}");
    still_served(&agent).await;
    hub.close().await;
}

fn bytes_payload(n: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from(vec![7u8; n])
}

#[tokio::test]
async fn a_client_that_never_says_hello_is_closed_after_the_handshake_timeout() {
    let config = TransportConfig { connection_timeout_ms: 300, ..cfg() };
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), config).await;
    let mut ws = raw_ws(&url).await;
    let took = closed_by_server(&mut ws).await;
    assert!(took >= Duration::from_millis(250), "closed before the deadline: {took:?}");
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn origin_allow_list() {
    let opts =
        WsOptions { allowed_origins: Some(vec!["http://127.0.0.1:8080".into()]), ..WsOptions::default() };
    let (hub, url, agent) = hub_and_agent(opts, cfg()).await;
    let evil = "Sec-WebSocket-Protocol: hivewire.v1\r\nOrigin: http://evil.example\r\n";
    assert_eq!(raw_http(&url, &upgrade_request("/", evil)).await, "HTTP/1.1 403 Forbidden");
    let good = "Sec-WebSocket-Protocol: hivewire.v1\r\nOrigin: http://127.0.0.1:8080\r\n";
    assert_eq!(raw_http(&url, &upgrade_request("/", good)).await, "HTTP/1.1 101 Switching Protocols");
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn connection_limit_at_and_past() {
    let opts = WsOptions { max_connections: 2, ..WsOptions::default() };
    let (hub, url, agent) = hub_and_agent(opts, cfg()).await;
    // `agent` holds one slot; a second agent takes the last one.
    let second = WebSocketTransport::new(WsMode::Client { url: url.clone() }, "second", cfg()).await.unwrap();
    let third = WebSocketTransport::new(WsMode::Client { url: url.clone() }, "third", cfg()).await;
    match third {
        Err(TransportError::ConnectionError(m)) => assert!(m.contains("503"), "{m}"),
        other => panic!("a third connection must get 503, got {other:?}"),
    }
    still_served(&agent).await;
    // A slot freed is a slot reusable.
    second.close().await;
    let deadline = Instant::now() + WAIT;
    loop {
        match WebSocketTransport::new(WsMode::Client { url: url.clone() }, "fourth", cfg()).await {
            Ok(n) => {
                n.close().await;
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the freed slot was never reused: {e}"),
        }
    }
    hub.close().await;
}

#[tokio::test]
async fn bearer_token_in_header_or_query() {
    let opts = WsOptions { bearer_token: Some("s3cret".into()), ..WsOptions::default() };
    let (hub, url) = hub_with(opts, cfg()).await;
    let none = WebSocketTransport::new(WsMode::Client { url: url.clone() }, "a", cfg()).await;
    assert!(matches!(&none, Err(TransportError::ConnectionError(m)) if m.contains("401")), "{none:?}");
    let wrong = WsOptions { bearer_token: Some("guess".into()), ..WsOptions::default() };
    let r = WebSocketTransport::with_options(WsMode::Client { url: url.clone() }, "b", cfg(), wrong).await;
    assert!(matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("401")), "{r:?}");
    let right = WsOptions { bearer_token: Some("s3cret".into()), ..WsOptions::default() };
    let c = WebSocketTransport::with_options(WsMode::Client { url: url.clone() }, "c", cfg(), right)
        .await
        .unwrap();
    let q = WebSocketTransport::new(WsMode::Client { url: format!("{url}?token=s3cret") }, "d", cfg())
        .await
        .unwrap();
    // The token reaches the authenticator's view of the peer.
    assert_eq!(hub.peer_info("c").unwrap().attributes.get(TOKEN_ATTR).map(String::as_str), Some("s3cret"));
    assert_eq!(hub.peer_info("d").unwrap().attributes.get(TOKEN_ATTR).map(String::as_str), Some("s3cret"));
    c.close().await;
    q.close().await;
    hub.close().await;
}

#[tokio::test]
async fn an_authenticator_sees_the_token() {
    // Per-agent tokens: the authenticator maps the presented token to the one agent it names.
    let config = TransportConfig {
        authenticator: Some(std::sync::Arc::new(
            |hello: &hivewire_core::HelloInfo<'_>, peer: &hivewire_core::PeerInfo| match peer
                .attributes
                .get(TOKEN_ATTR)
            {
                Some(t) if *t == format!("key-{}", hello.agent_id) => Ok(()),
                _ => Err("token does not match the agent".into()),
            },
        )),
        ..cfg()
    };
    let (hub, url) = hub_with(WsOptions::default(), config).await;
    let ok =
        WebSocketTransport::new(WsMode::Client { url: format!("{url}?token=key-alice") }, "alice", cfg())
            .await;
    assert!(ok.is_ok(), "{ok:?}");
    let bad =
        WebSocketTransport::new(WsMode::Client { url: format!("{url}?token=key-alice") }, "mallory", cfg())
            .await;
    assert!(matches!(bad, Err(TransportError::Rejected(_))), "{bad:?}");
    hub.close().await;
}

#[tokio::test]
async fn pings_keep_the_connection_alive() {
    let opts = WsOptions { ping_interval: Some(Duration::from_millis(50)), ..WsOptions::default() };
    let (hub, url, agent) = hub_and_agent(opts, cfg()).await;
    let mut ws = raw_ws(&url).await;
    let got_ping = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if matches!(m, WsMessage::Ping(_)) {
                return true;
            }
        }
        false
    })
    .await
    .expect("no ping within the wait");
    assert!(got_ping);
    still_served(&agent).await;
    hub.close().await;
}

fn wss_server(pki: &TestPki, client_ca: bool) -> TransportConfig {
    let mut c = cfg();
    c.tls.cert_chain_pem = Some(pki.server.cert_pem.clone().into_bytes());
    c.tls.key_pem = Some(pki.server.key_pem.clone().into_bytes());
    if client_ca {
        c.tls.ca_pem = Some(pki.ca_pem.clone().into_bytes());
        c.tls.require_client_cert = true;
    }
    c
}

fn wss_client(ca_pem: &str) -> TransportConfig {
    let mut c = cfg();
    c.tls.ca_pem = Some(ca_pem.as_bytes().to_vec());
    c
}

async fn wss_hub(config: TransportConfig) -> (Node, String) {
    let hub =
        WebSocketTransport::new(WsMode::SecureServer { bind_addr: "127.0.0.1:0".into() }, "hub", config)
            .await
            .expect("listen wss");
    let url = hub.listen_url().unwrap().replace("127.0.0.1", "localhost");
    (hub, url)
}

#[tokio::test]
async fn wss_verifies_the_server_by_default() {
    let pki = generate().unwrap();
    let (hub, url) = wss_hub(wss_server(&pki, false)).await;
    assert!(url.starts_with("wss://localhost:"), "{url}");
    let ok =
        WebSocketTransport::new(WsMode::Client { url: url.clone() }, "ok", wss_client(&pki.ca_pem)).await;
    assert!(ok.is_ok(), "{ok:?}");
    // A client trusting another CA refuses the server, with a clear error.
    let other = generate().unwrap();
    let r =
        WebSocketTransport::new(WsMode::Client { url: url.clone() }, "x", wss_client(&other.ca_pem)).await;
    assert!(matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("TLS handshake")), "{r:?}");
    // No CA at all is a configuration error, not a silent opt-out.
    let r = WebSocketTransport::new(WsMode::Client { url: url.clone() }, "y", cfg()).await;
    assert!(matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("ca_pem")), "{r:?}");
    // The explicit, named opt-out connects anyway.
    let mut dangerous = cfg();
    dangerous.tls.dangerous_accept_any_server_certificate = true;
    let r = WebSocketTransport::new(WsMode::Client { url: url.clone() }, "z", dangerous).await;
    assert!(r.is_ok(), "{r:?}");
    hub.close().await;
}

#[tokio::test]
async fn wss_wrong_name_and_expired_certificates_fail() {
    let pki = generate().unwrap();
    for (bad, what) in [(&pki.wrong_name, "wrong name"), (&pki.expired, "expired")] {
        let mut server = cfg();
        server.tls.cert_chain_pem = Some(bad.cert_pem.clone().into_bytes());
        server.tls.key_pem = Some(bad.key_pem.clone().into_bytes());
        let (hub, url) = wss_hub(server).await;
        let r = WebSocketTransport::new(WsMode::Client { url }, "x", wss_client(&pki.ca_pem)).await;
        assert!(
            matches!(&r, Err(TransportError::ConnectionError(m)) if m.contains("TLS handshake")),
            "{what}: {r:?}"
        );
        hub.close().await;
    }
}

#[tokio::test]
async fn wss_mutual_tls_shows_the_client_identity() {
    let pki = generate().unwrap();
    let (hub, url) = wss_hub(wss_server(&pki, true)).await;
    // Without a client certificate: refused.
    let r =
        WebSocketTransport::new(WsMode::Client { url: url.clone() }, "anon", wss_client(&pki.ca_pem)).await;
    assert!(r.is_err(), "a client without a certificate got in: {r:?}");
    let mut with_cert = wss_client(&pki.ca_pem);
    with_cert.tls.client_cert_pem = Some(pki.client.cert_pem.clone().into_bytes());
    with_cert.tls.client_key_pem = Some(pki.client.key_pem.clone().into_bytes());
    let c = WebSocketTransport::new(WsMode::Client { url }, "known", with_cert).await.expect("mTLS client");
    let info = hub.peer_info("known").unwrap();
    let fp = info.attributes.get(hivewire_core::tls::CLIENT_CERT_SHA256).expect("client identity");
    assert_eq!(fp.len(), 64);
    c.close().await;
    hub.close().await;
}

/// Upgrades a raw TCP connection by hand; returns the socket after the 101 response.
async fn raw_upgraded(url: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr_of(url)).await.unwrap();
    s.write_all(upgrade_request("/", "Sec-WebSocket-Protocol: hivewire.v1\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A client frame: FIN as given, `opcode`, masked with `key` (or unmasked).
fn client_frame(fin: bool, opcode: u8, payload: &[u8], key: Option<[u8; 4]>) -> Vec<u8> {
    assert!(payload.len() < 126);
    let mut f = vec![(if fin { 0x80 } else { 0 }) | opcode];
    match key {
        Some(k) => {
            f.push(0x80 | payload.len() as u8);
            f.extend_from_slice(&k);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => {
            f.push(payload.len() as u8);
            f.extend_from_slice(payload);
        }
    }
    f
}

/// The Hello of docs/WIRE.md §5.1.
const GOLDEN_HELLO: &str = "48570100000000579b01c0a76167656e742d31c081a7436f6e74726f6c81a548656c6c6f9392010092a6707562737562b0636f6d7072657373696f6e2e7a73746481a5746f6b656ea673336372657480ccff08cf0000018bcfe5680000c400";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

#[tokio::test]
async fn an_unmasked_client_frame_closes_only_that_link() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let mut s = raw_upgraded(&url).await;
    s.write_all(&client_frame(true, 0x2, &hex(GOLDEN_HELLO), None)).await.unwrap();
    let mut out = Vec::new();
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server never closed")
        .unwrap_or(0);
    assert!(n == 0 || out[0] & 0x0F == 0x8, "expected the link closed, got {out:02x?}");
    still_served(&agent).await;
    hub.close().await;
}

#[tokio::test]
async fn a_fragmented_hello_is_reassembled() {
    let (hub, url, agent) = hub_and_agent(WsOptions::default(), cfg()).await;
    let mut s = raw_upgraded(&url).await;
    let hello = hex(GOLDEN_HELLO);
    let (a, b) = hello.split_at(40);
    let key = Some([9, 8, 7, 6]);
    s.write_all(&client_frame(false, 0x2, a, key)).await.unwrap();
    // A ping between the fragments is answered and does not disturb the message.
    s.write_all(&client_frame(true, 0x9, b"are you there", key)).await.unwrap();
    s.write_all(&client_frame(true, 0x0, b, key)).await.unwrap();
    let mut seen_pong = false;
    let ack = tokio::time::timeout(WAIT, async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.unwrap();
            assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
            let len = match h[1] & 0x7F {
                126 => {
                    let mut l = [0u8; 2];
                    s.read_exact(&mut l).await.unwrap();
                    u16::from_be_bytes(l) as usize
                }
                l => l as usize,
            };
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            match h[0] & 0x0F {
                0xA => {
                    assert_eq!(payload, b"are you there");
                    seen_pong = true;
                }
                0x2 => return payload,
                op => panic!("unexpected opcode {op:#x}"),
            }
        }
    })
    .await
    .expect("no HelloAck");
    assert!(seen_pong, "the ping was not answered before the HelloAck");
    assert_eq!(&ack[..2], b"HW");
    assert!(hub.peers().iter().any(|p| p.as_str() == "agent-1"), "the golden Hello's agent joined");
    still_served(&agent).await;
    hub.close().await;
}

//! The direct write's datagram path (`LinkTx::try_send_now`) over a real socket on loopback: a
//! message that fits one datagram goes out at once, exactly as `send_batch` frames it; a
//! control message (sent several times) and one needing fragments are declined untouched.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hivewire_codec::{CodecConfig, FrameCodec};
use hivewire_core::protocol::ControlOperation;
use hivewire_core::{try_send_once, LinkTx, Message, MessageType, TransportConfig, TrySend};
use hivewire_udp::datagram::HEADER_LEN;
use hivewire_udp::UdpOptions;
use tokio::net::UdpSocket;

/// The next datagram at `sock` that carries something (the session's opening datagrams are
/// bare headers), within a second.
async fn next_loaded(sock: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(1), sock.recv(&mut buf)).await.ok()?.ok()?;
        if n > HEADER_LEN {
            return Some(buf[..n].to_vec());
        }
    }
}

#[tokio::test]
async fn a_datagram_sized_message_goes_out_at_once_and_others_are_declined() {
    let hub = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = hub.local_addr().unwrap();
    let config = TransportConfig::default();
    let opts = UdpOptions::default();
    let link = hivewire_udp::dial_link(&addr.to_string(), &config, &opts).await.unwrap();
    let mut tx = link.tx;

    let event = Message::new("a", MessageType::Event { topic: "t.x".into() })
        .with_payload_bytes(Bytes::from_static(&[7u8; 64]));
    assert!(matches!(try_send_once(&mut tx, &event).await, TrySend::Sent));
    let d = next_loaded(&hub).await.expect("the event's datagram");
    let mut codec = FrameCodec::new(CodecConfig::default());
    let mut body = BytesMut::from(&d[HEADER_LEN..]);
    assert_eq!(codec.decode_from(&mut body).unwrap(), Some(event), "one frame, the event");
    assert!(body.is_empty(), "nothing else in the datagram");

    let goodbye =
        Message::new("a", MessageType::Control(ControlOperation::Goodbye { reason: "test".into() }));
    assert!(matches!(try_send_once(&mut tx, &goodbye).await, TrySend::Declined));
    let large = Message::new("a", MessageType::Event { topic: "t.y".into() })
        .with_payload_bytes(Bytes::from(vec![1u8; opts.max_packet_size]));
    assert!(matches!(try_send_once(&mut tx, &large).await, TrySend::Declined));
    // Declined means untouched: an empty batch has nothing to send.
    tx.send_batch(&mut Vec::new()).await.unwrap();
    assert_eq!(next_loaded(&hub).await, None, "nothing was sent for the declined messages");
}

//! The framed link's write path over real streams: batches mixing small frames and large ones
//! (whose payloads go out by vectored writes from the messages' own memory) arrive whole and in
//! order, through partial writes, and a send cancelled midway leaves the stream intact.

use std::time::Duration;

use bytes::Bytes;
use hivewire_core::{framed_halves, LinkRx, LinkTx, PeerInfo};
use hivewire_protocol::{Message, MessageType};

fn msg(i: usize, len: usize) -> Message {
    let payload: Vec<u8> = (0..len).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect();
    Message::new("a", MessageType::Event { topic: format!("t.{i}").into() })
        .with_payload_bytes(Bytes::from(payload))
}

/// Sizes around the split threshold and the write boundary, small ones between.
const SIZES: [usize; 9] = [0, 70_000, 5, 8 * 1024, 8 * 1024 - 1, 200_000, 64, 20_000, 1];

async fn tcp_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (c, s) = tokio::join!(tokio::net::TcpStream::connect(addr), l.accept());
    (c.unwrap(), s.unwrap().0)
}

#[tokio::test]
async fn mixed_batches_over_tcp_arrive_whole_and_in_order() {
    let (c, s) = tcp_pair().await;
    assert!(tokio::io::AsyncWrite::is_write_vectored(&c), "tcp takes the vectored path");
    let (_cr, cw) = c.into_split();
    let (sr, _sw) = s.into_split();
    let mut tx = framed_halves(tokio::io::empty(), cw, 1 << 20, 4096, PeerInfo::default()).tx;
    let mut rx = framed_halves(sr, tokio::io::sink(), 1 << 20, 4096, PeerInfo::default()).rx;
    let sent: Vec<Message> = (0..60).map(|i| msg(i, SIZES[i % SIZES.len()])).collect();
    let expect = sent.clone();
    // The reader starts late, so the writer meets a full socket buffer (partial writes).
    let reader = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut got = Vec::new();
        while got.len() < 60 {
            got.push(rx.recv().await.unwrap().expect("a message"));
        }
        got
    });
    for chunk in sent.chunks(7) {
        let mut batch = chunk.to_vec();
        tx.send_batch(&mut batch).await.unwrap();
        assert!(batch.is_empty());
    }
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    assert_eq!(got, expect);
}

#[tokio::test]
async fn mixed_batches_through_a_tiny_non_vectored_pipe_arrive_whole() {
    // A 100-byte duplex: every frame is written in many partial writes, without vectored I/O.
    let (a, b) = tokio::io::duplex(100);
    let (_ar, aw) = tokio::io::split(a);
    let (br, _bw) = tokio::io::split(b);
    let mut tx = framed_halves(tokio::io::empty(), aw, 1 << 20, 4096, PeerInfo::default()).tx;
    let mut rx = framed_halves(br, tokio::io::sink(), 1 << 20, 4096, PeerInfo::default()).rx;
    let sent: Vec<Message> = (0..18).map(|i| msg(i, SIZES[i % SIZES.len()])).collect();
    let expect = sent.clone();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 18 {
            got.push(rx.recv().await.unwrap().expect("a message"));
        }
        got
    });
    for chunk in sent.chunks(4) {
        tx.send_batch(&mut chunk.to_vec()).await.unwrap();
    }
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    assert_eq!(got, expect);
}

#[tokio::test]
async fn a_send_cancelled_midway_leaves_the_stream_intact() {
    let (c, s) = tcp_pair().await;
    let (_cr, cw) = c.into_split();
    let (sr, _sw) = s.into_split();
    let mut tx = framed_halves(tokio::io::empty(), cw, 4 << 20, 4096, PeerInfo::default()).tx;
    let mut rx = framed_halves(sr, tokio::io::sink(), 4 << 20, 4096, PeerInfo::default()).rx;
    // Far more than the socket buffers hold while nobody reads: the send blocks and is dropped.
    let first: Vec<Message> = (0..8).map(|i| msg(i, 3 << 20)).collect();
    let mut batch = first.clone();
    let cancelled = tokio::time::timeout(Duration::from_millis(200), tx.send_batch(&mut batch)).await;
    assert!(cancelled.is_err(), "the send should still be blocked on the full socket");
    let last = msg(99, 10);
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        loop {
            let m = rx.recv().await.expect("the stream stays decodable").expect("a message");
            let done = m.payload.len() == 10;
            got.push(m);
            if done {
                return got;
            }
        }
    });
    tx.send_batch(&mut vec![last.clone()]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    // What the cancelled send had encoded goes out first, whole and in order; then the new one.
    let (tail, head) = got.split_last().unwrap();
    assert_eq!(tail, &last);
    assert!(!head.is_empty() && head.len() <= first.len());
    assert_eq!(head, &first[..head.len()]);
}

#[tokio::test]
async fn a_message_tried_now_is_written_whole_started_or_declined_and_always_arrives() {
    use hivewire_core::TrySend;
    // A 100-byte duplex: a 64-byte message fits once; a second one meets a full pipe.
    let (a, b) = tokio::io::duplex(100);
    let (_ar, aw) = tokio::io::split(a);
    let (br, _bw) = tokio::io::split(b);
    let mut tx = framed_halves(tokio::io::empty(), aw, 1 << 20, 4096, PeerInfo::default()).tx;
    let mut rx = framed_halves(br, tokio::io::sink(), 1 << 20, 4096, PeerInfo::default()).rx;
    let (small, next, large) = (msg(1, 20), msg(2, 64), msg(3, 8 * 1024));

    assert!(matches!(hivewire_core::try_send_once(&mut tx, &small).await, TrySend::Sent));
    // Only part of this frame fits: the rest waits in the link's buffer...
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &next).await, TrySend::Started));
    // ...so nothing else is tried until it is out, not even a small message.
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &small).await, TrySend::Declined));
    // A payload of the split size never is: it goes out from its own memory by `send_batch`.
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &large).await, TrySend::Declined));

    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        while got.len() < 3 {
            got.push(rx.recv().await.unwrap().expect("a message"));
        }
        got
    });
    // An empty batch finishes the started frame; the declined message follows it.
    tx.send_batch(&mut Vec::new()).await.unwrap();
    tx.send_batch(&mut vec![large.clone()]).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(20), reader).await.unwrap().unwrap();
    assert_eq!(got, vec![small, next, large]);
}

#[tokio::test]
async fn a_message_too_large_to_encode_fails_the_try_and_leaves_the_link_clean() {
    use hivewire_core::TrySend;
    let (a, b) = tokio::io::duplex(1 << 16);
    let (_ar, aw) = tokio::io::split(a);
    let (br, _bw) = tokio::io::split(b);
    // max_message_size 16: a 20-byte payload cannot be framed.
    let mut tx = framed_halves(tokio::io::empty(), aw, 16, 4096, PeerInfo::default()).tx;
    let mut rx = framed_halves(br, tokio::io::sink(), 1 << 20, 4096, PeerInfo::default()).rx;
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &msg(1, 20)).await, TrySend::Failed(_)));
    let fits = msg(2, 10);
    assert!(matches!(hivewire_core::try_send_once(&mut tx, &fits).await, TrySend::Sent));
    let got = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap();
    assert_eq!(got, Some(fits));
}

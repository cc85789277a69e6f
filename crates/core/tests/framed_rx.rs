//! The framed link's read path for large frames: a frame of at least
//! `hivewire_codec::blocks::MIN_BLOCK` bytes is read into a receive block of its own, which goes
//! back to the process's pool once its message is dropped. Receives cancelled while such a frame
//! is half read lose nothing, and a stream that ends inside one is an error. (The pool's reuse
//! is tested in `receive_blocks.rs`, a binary of its own, so that no other test shares the pool.)

use std::time::{Duration, Instant};

use hivewire_codec::blocks;
use hivewire_core::{framed_halves, LinkRx, PeerInfo, TransportError};
use hivewire_protocol::Message;
use tokio::io::AsyncWriteExt;

mod common;
use common::{patterned as msg, wire};

#[tokio::test]
async fn receives_cancelled_inside_large_frames_lose_nothing() {
    // Large frames (one just past the block threshold), small ones between and after them.
    let sizes = [100_000, 10, blocks::MIN_BLOCK, 0, 50_000, 70_000, 3];
    let sent: Vec<Message> = sizes.iter().enumerate().map(|(i, &len)| msg(i, len)).collect();
    let bytes = wire(&sent);
    let (a, b) = tokio::io::duplex(4096);
    let mut rx = framed_halves(b, tokio::io::sink(), 1 << 20, usize::MAX, PeerInfo::default()).rx;
    // The bytes trickle in, 3 kB a millisecond: every large frame takes many reads.
    let writer = tokio::spawn(async move {
        let mut a = a;
        for chunk in bytes.chunks(3000) {
            a.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        a
    });
    let mut got = Vec::new();
    let mut cancelled = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.len() < sent.len() && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_micros(300), rx.recv()).await {
            Err(_) => cancelled += 1,
            Ok(r) => got.push(r.unwrap().expect("a message")),
        }
    }
    assert!(cancelled > 20, "receives were cancelled midway ({cancelled})");
    assert_eq!(got, sent);
    drop(writer.await.unwrap());
    assert!(rx.recv().await.unwrap().is_none(), "a clean end after the last frame");
}

#[tokio::test]
async fn a_stream_ending_inside_a_large_frame_is_an_error() {
    let bytes = wire(&[msg(1, 10), msg(2, 100_000)]);
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut rx = framed_halves(b, tokio::io::sink(), 1 << 20, usize::MAX, PeerInfo::default()).rx;
    let mut a = a;
    a.write_all(&bytes[..40_000]).await.unwrap();
    drop(a);
    assert_eq!(rx.recv().await.unwrap().expect("the small frame before").payload.len(), 10);
    match rx.recv().await {
        Err(TransportError::ConnectionError(e)) => assert!(e.contains("inside a frame"), "{e}"),
        other => panic!("expected an error for the cut frame, got {other:?}"),
    }
}

/// Counts the reads of the stream under it that returned bytes.
struct CountingReader<R> {
    inner: R,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for CountingReader<R> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, std::task::Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }
}

#[tokio::test]
async fn a_stream_of_large_frames_needs_no_read_for_a_header_alone() {
    // Six large frames back to back, all written before the first read: each block's last
    // read takes the next frame's header with it.
    const FRAMES: usize = 6;
    let sent: Vec<Message> = (0..FRAMES).map(|i| msg(i, 100_000)).collect();
    let bytes = wire(&sent);
    let (mut a, b) = tokio::io::duplex(bytes.len() + 1);
    a.write_all(&bytes).await.unwrap();
    drop(a);
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = CountingReader { inner: b, reads: reads.clone() };
    let mut rx = framed_halves(counted, tokio::io::sink(), 1 << 20, usize::MAX, PeerInfo::default()).rx;
    let mut got = Vec::new();
    while let Some(m) = rx.recv().await.unwrap() {
        got.push(m);
    }
    assert_eq!(got, sent);
    let reads = reads.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("{FRAMES} large frames in {reads} reads");
    // One read per frame and the first one's start: with a read for each header alone it
    // took two per frame.
    assert!(reads <= FRAMES + 1, "{reads} reads for {FRAMES} large frames");
}

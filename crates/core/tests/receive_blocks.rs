//! Receive blocks across messages: a large frame's block goes back to the process's pool once
//! every part of its message is dropped, and serves the next large frame. A binary of its own:
//! the pool is process-wide, and no other test may take from it or add to it meanwhile.

use hivewire_codec::blocks;
use hivewire_core::{framed_halves, LinkRx, PeerInfo};
use hivewire_protocol::Message;
use tokio::io::AsyncWriteExt;

mod common;
use common::{patterned as msg, wire};

#[tokio::test]
async fn a_dropped_large_message_s_block_serves_the_next_large_frame() {
    let len = 300_000;
    let sent: Vec<Message> = (1..=4).map(|i| msg(i, len)).collect();
    // Where each payload starts in its frame (the payload ends the frame), hence in its block.
    let offset: Vec<usize> = sent.iter().map(|m| wire(std::slice::from_ref(m)).len() - len).collect();
    let (a, b) = tokio::io::duplex(1 << 20);
    let mut rx = framed_halves(b, tokio::io::sink(), 1 << 20, usize::MAX, PeerInfo::default()).rx;
    let bytes = wire(&sent);
    let writer = tokio::spawn(async move {
        let mut a = a;
        a.write_all(&bytes).await.unwrap();
        a
    });
    let block_of = |m: &Message, i: usize| m.payload.as_ptr() as usize - offset[i];
    let first = rx.recv().await.unwrap().expect("first");
    let second = rx.recv().await.unwrap().expect("second");
    assert_ne!(block_of(&first, 0), block_of(&second, 1), "two live messages, two blocks");
    let first_block = block_of(&first, 0);
    // A clone of the payload keeps the block in use: the next frame gets another one.
    let payload = first.payload.clone();
    drop(first);
    let third = rx.recv().await.unwrap().expect("third");
    assert_eq!(third, sent[2]);
    let third_block = block_of(&third, 2);
    assert!(![first_block, block_of(&second, 1)].contains(&third_block), "a block in use was reused");
    // Both released: they are in the pool, and the fourth frame is read into one of them.
    let before = blocks::pooled_bytes();
    drop((payload, third));
    let kept = blocks::pooled_bytes() - before;
    assert!(kept >= 2 * len, "the released blocks were not kept ({kept} bytes)");
    let fourth = rx.recv().await.unwrap().expect("fourth");
    assert!(blocks::pooled_bytes() - before < kept, "the fourth frame took no block from the pool");
    assert_eq!(fourth, sent[3]);
    assert!(
        [first_block, third_block].contains(&block_of(&fourth, 3)),
        "the fourth frame did not reuse a released block"
    );
    drop((second, writer.await.unwrap()));
}

//! Every error of the codec at and past its limit, and property tests of the whole frame path.

use std::io::Write;

use bytes::{BufMut, Bytes, BytesMut};
use hivewire_codec::{
    CodecConfig, CodecError, Compression, FrameCodec, InPlace, ENVELOPE_ALLOWANCE, HEADER_LEN,
};
use hivewire_protocol::{ControlOperation, Message, MessageType, ResponseStatus};
use proptest::prelude::*;

fn codec(max: usize) -> FrameCodec {
    FrameCodec::new(CodecConfig { max_message_size: max, ..CodecConfig::default() })
}

fn all_accepting(c: Compression, threshold: usize) -> FrameCodec {
    FrameCodec::new(CodecConfig {
        compression: c,
        compression_threshold: threshold,
        accept_gzip: true,
        accept_zstd: true,
        ..CodecConfig::default()
    })
}

fn event_with(len: usize) -> Message {
    Message::new("a", MessageType::Event { topic: "t".into() })
        .with_payload_bytes(Bytes::from(vec![0x5a; len]))
}

fn header(flags: u8, len: u32) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_slice(b"HW");
    b.put_u8(1);
    b.put_u8(flags);
    b.put_u32(len);
    b
}

#[test]
fn payload_at_the_limit_encodes_and_one_more_does_not() {
    let mut c = codec(1000);
    let mut buf = BytesMut::new();
    c.encode_into(&event_with(1000), &mut buf).unwrap();
    let before = buf.len();
    let err = c.encode_into(&event_with(1001), &mut buf).unwrap_err();
    assert!(matches!(err, CodecError::MessageTooLarge { size: 1001, max: 1000 }), "{err}");
    assert_eq!(buf.len(), before, "a refused message writes nothing");
    let back = c.decode_from(&mut buf).unwrap().unwrap();
    assert_eq!(back.payload.len(), 1000);
}

#[test]
fn oversized_envelope_is_refused() {
    let mut c = codec(1000);
    let m = event_with(1).with_header("big", "x".repeat(ENVELOPE_ALLOWANCE + 1));
    let err = c.encode_into(&m, &mut BytesMut::new()).unwrap_err();
    assert!(matches!(err, CodecError::MessageTooLarge { max: ENVELOPE_ALLOWANCE, .. }), "{err}");
}

#[test]
fn header_claiming_4_gib_is_refused_before_allocating() {
    let mut c = codec(1 << 20);
    let mut buf = header(0, u32::MAX);
    let cap = buf.capacity();
    let err = c.decode_from(&mut buf).unwrap_err();
    assert!(matches!(err, CodecError::FrameTooLarge { size, .. } if size == u32::MAX as usize), "{err}");
    assert_eq!(buf.capacity(), cap, "nothing reserved for the claimed body");
    // Exactly at the limit is accepted as a header (waits for the body).
    let limit = (1 << 20) + ENVELOPE_ALLOWANCE;
    let mut buf = header(0, limit as u32);
    assert!(c.decode_from(&mut buf).unwrap().is_none());
    let mut buf = header(0, limit as u32 + 1);
    assert!(matches!(c.decode_from(&mut buf), Err(CodecError::FrameTooLarge { .. })));
}

#[test]
fn bad_headers_are_typed_errors() {
    let mut c = codec(1 << 20);
    let mut b = BytesMut::from(&b"XY\x01\x00\x00\x00\x00\x01"[..]);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::BadMagic([b'X', b'Y']))));
    let mut b = BytesMut::from(&b"HW\x02\x00\x00\x00\x00\x01"[..]);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::UnsupportedVersion(2))));
    let mut b = header(0b100, 1);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::ReservedFlags(0b100))));
    let mut b = header(3, 1);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::UnknownCompression(3))));
    let mut b = header(2, 1);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::CompressionNotNegotiated(Compression::Zstd))));
    let mut b = header(1, 1);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::CompressionNotNegotiated(Compression::Gzip))));
    let mut b = header(0, 3);
    b.put_slice(&[0xc1, 0xc1, 0xc1]);
    assert!(matches!(c.decode_from(&mut b), Err(CodecError::Decode(_))));
}

#[test]
fn partial_frames_wait_and_two_frames_split() {
    let mut c = codec(1 << 20);
    let mut whole = BytesMut::new();
    c.encode_into(&event_with(100), &mut whole).unwrap();
    c.encode_into(&event_with(7), &mut whole).unwrap();
    let first_len = HEADER_LEN + u32::from_be_bytes([whole[4], whole[5], whole[6], whole[7]]) as usize;
    let mut buf = BytesMut::new();
    for (i, b) in whole.iter().enumerate() {
        buf.put_u8(*b);
        let got = c.decode_from(&mut buf).unwrap();
        if i + 1 == first_len {
            assert_eq!(got.unwrap().payload.len(), 100);
        } else if i + 1 == whole.len() {
            assert_eq!(got.unwrap().payload.len(), 7);
        } else {
            assert!(got.is_none(), "byte {i}");
        }
    }
}

#[test]
fn gzip_and_zstd_round_trip_and_shrink() {
    for algo in [Compression::Gzip, Compression::Zstd] {
        let mut c = all_accepting(algo, 64);
        let m = event_with(100_000);
        let mut buf = BytesMut::new();
        c.encode_into(&m, &mut buf).unwrap();
        assert!(buf.len() < 10_000, "{algo:?} did not compress: {}", buf.len());
        assert_ne!(buf[3], 0, "{algo:?} flag not set");
        assert_eq!(c.decode_from(&mut buf).unwrap().unwrap(), m);
        // Below the threshold nothing is compressed.
        let small = event_with(10);
        c.encode_into(&small, &mut buf).unwrap();
        assert_eq!(buf[3], 0);
        assert_eq!(c.decode_from(&mut buf).unwrap().unwrap(), small);
    }
}

#[test]
fn incompressible_bodies_go_out_plain() {
    let mut c = all_accepting(Compression::Zstd, 16);
    // xorshift64: incompressible for any general-purpose compressor.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let m = event_with(0).with_payload_bytes(Bytes::from(noise));
    let mut buf = BytesMut::new();
    c.encode_into(&m, &mut buf).unwrap();
    assert_eq!(buf[3], 0, "compression that does not shrink must not be used");
    assert_eq!(c.decode_from(&mut buf).unwrap().unwrap(), m);
}

fn bomb(algo: Compression, size: usize) -> Vec<u8> {
    let zeros = vec![0u8; size];
    match algo {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            e.write_all(&zeros).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::bulk::compress(&zeros, 19).unwrap(),
        Compression::None => zeros,
    }
}

#[test]
fn decompression_bombs_stop_at_the_limit() {
    for (algo, flag) in [(Compression::Gzip, 1u8), (Compression::Zstd, 2u8)] {
        let body = bomb(algo, 64 << 20);
        assert!(body.len() < 1 << 20, "the bomb must itself be small");
        let mut c = FrameCodec::new(CodecConfig {
            max_message_size: 1 << 20,
            accept_gzip: true,
            accept_zstd: true,
            ..CodecConfig::default()
        });
        let mut buf = header(flag, body.len() as u32);
        buf.put_slice(&body);
        let err = c.decode_from(&mut buf).unwrap_err();
        assert!(matches!(err, CodecError::DecompressedTooLarge { .. }), "{algo:?}: {err}");
    }
}

#[test]
fn zstd_without_declared_size_is_still_bounded() {
    let zeros = vec![0u8; 8 << 20];
    let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 3).unwrap();
    enc.include_contentsize(false).unwrap();
    enc.write_all(&zeros).unwrap();
    let body = enc.finish().unwrap();
    let mut c = FrameCodec::new(CodecConfig {
        max_message_size: 1 << 20,
        accept_zstd: true,
        ..CodecConfig::default()
    });
    let mut buf = header(2, body.len() as u32);
    buf.put_slice(&body);
    assert!(matches!(c.decode_from(&mut buf), Err(CodecError::DecompressedTooLarge { .. })));
}

fn arb_kind() -> impl Strategy<Value = MessageType> {
    prop_oneof![
        "[a-z.]{1,20}".prop_map(|method| MessageType::Request { method: method.into() }),
        Just(MessageType::Response { status: ResponseStatus::Ok }),
        (any::<u32>(), ".{0,30}").prop_map(|(code, message)| MessageType::Response {
            status: ResponseStatus::Error { code, message }
        }),
        "[a-z.]{1,20}".prop_map(|topic| MessageType::Event { topic: topic.into() }),
        "[a-z.]{1,20}".prop_map(|topic| MessageType::Broadcast { topic: topic.into() }),
        Just(MessageType::Heartbeat),
        "[a-z*.]{1,20}".prop_map(|pattern| MessageType::Control(ControlOperation::Subscribe { pattern })),
        ".{0,20}".prop_map(|reason| MessageType::Control(ControlOperation::Goodbye { reason })),
        "[a-z*.]{1,20}".prop_map(|pattern| MessageType::Control(ControlOperation::Unsubscribe { pattern })),
        (
            any::<u16>(),
            any::<u16>(),
            proptest::collection::vec("[a-z.]{0,12}", 0..4),
            proptest::collection::btree_map("[a-z]{1,6}", ".{0,8}", 0..3)
        )
            .prop_map(|(major, minor, capabilities, metadata)| MessageType::Control(
                ControlOperation::HelloAck {
                    version: hivewire_protocol::ProtocolVersion::new(major, minor),
                    capabilities,
                    metadata
                }
            )),
        prop_oneof![
            (any::<u16>(), any::<u16>()).prop_map(|(a, b)| {
                hivewire_protocol::RejectReason::VersionMismatch {
                    ours: hivewire_protocol::ProtocolVersion::new(a, b),
                    theirs: hivewire_protocol::ProtocolVersion::new(b, a),
                }
            }),
            "[a-z]{0,8}".prop_map(|s| hivewire_protocol::RejectReason::DuplicateAgentId(s.into())),
            ".{0,12}".prop_map(hivewire_protocol::RejectReason::Unauthorized),
            ".{0,12}".prop_map(hivewire_protocol::RejectReason::Malformed),
            Just(hivewire_protocol::RejectReason::Overloaded),
        ]
        .prop_map(|reason| MessageType::Control(ControlOperation::Reject { reason })),
    ]
}

/// Every compression mode a frame can be written with.
fn arb_compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::None), Just(Compression::Gzip), Just(Compression::Zstd)]
}

prop_compose! {
    fn arb_message()(
        id in any::<u64>(),
        correlation_id in any::<Option<u64>>(),
        source in "[a-z0-9-]{0,16}",
        destination in proptest::option::of("[a-z0-9-]{1,16}"),
        kind in arb_kind(),
        headers in proptest::collection::btree_map("[a-z]{1,8}", ".{0,16}", 0..4),
        priority in any::<u8>(),
        ttl in any::<u8>(),
        timestamp_ms in any::<u64>(),
        sequence in any::<u64>(),
        payload_len in prop_oneof![0usize..64, 4000usize..5000, 60_000usize..70_000],
        fill in any::<u8>(),
        repetitive in any::<bool>(),
    ) -> Message {
        let payload: Vec<u8> = (0..payload_len)
            .map(|i| if repetitive { fill } else { (i as u8).wrapping_mul(fill | 1).wrapping_add(i as u8 >> 3) })
            .collect();
        Message {
            id, correlation_id, source: source.into(), destination: destination.map(Into::into), kind, headers: headers.into(),
            priority, ttl, timestamp_ms, sequence, payload: Bytes::from(payload),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn round_trip_in_every_compression_mode(m in arb_message(), algo in arb_compression(), threshold in 0usize..8192) {
        let mut c = all_accepting(algo, threshold);
        let mut buf = BytesMut::new();
        c.encode_into(&m, &mut buf).unwrap();
        let back = c.decode_from(&mut buf).unwrap().unwrap();
        prop_assert_eq!(back, m);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn a_split_frame_plus_its_payload_is_the_whole_frame(m in arb_message(), algo in arb_compression()) {
        let mut c = all_accepting(algo, 4096);
        let (mut whole, mut split) = (BytesMut::new(), BytesMut::new());
        c.encode_into(&m, &mut whole).unwrap();
        let left_out = c.encode_split(&m, &mut split).unwrap();
        prop_assert_eq!(
            left_out,
            algo == Compression::None && m.payload.len() >= hivewire_codec::SPLIT_PAYLOAD_MIN
        );
        if left_out {
            split.extend_from_slice(&m.payload);
        }
        prop_assert_eq!(&split, &whole);
        prop_assert_eq!(c.decode_from(&mut split).unwrap().unwrap(), m);
    }

    /// A frame read where it lies gives the message `decode_from` gives: an uncompressed one
    /// with its payload lent from the frame, a compressed one decoded with a copy.
    #[test]
    fn a_frame_decoded_in_place_is_the_message_decoded_from_a_buffer(m in arb_message(), algo in arb_compression(), threshold in 0usize..8192) {
        let mut c = all_accepting(algo, threshold);
        let mut buf = BytesMut::new();
        c.encode_into(&m, &mut buf).unwrap();
        let compressed = buf[3] != 0;
        let frame = buf.to_vec();
        match c.decode_in_place(&frame).unwrap() {
            InPlace::Lent { envelope, payload } => {
                prop_assert!(!compressed);
                prop_assert!(envelope.payload.is_empty());
                prop_assert_eq!(&frame[payload.clone()], &m.payload[..]);
                prop_assert_eq!(payload.end, frame.len());
                prop_assert_eq!(Message { payload: m.payload.clone(), ..envelope }, m.clone());
            }
            InPlace::Copied(back) => {
                prop_assert!(compressed);
                prop_assert_eq!(back, m.clone());
            }
        }
        prop_assert_eq!(c.decode_from(&mut buf).unwrap().unwrap(), m);
    }

    /// One link's codec decodes a run of envelopes that mostly repeat their middle fields
    /// (source, destination, kind, headers, priority, hop limit), each differing from the one
    /// before in one field or none, into exactly the messages sent: nothing decoded from an
    /// earlier envelope leaks into a later one.
    #[test]
    fn a_run_of_similar_envelopes_decodes_exactly_through_one_codec(
        base in arb_message(),
        changes in proptest::collection::vec((0u8..10, arb_message()), 1..24),
    ) {
        let mut sent = vec![base];
        for (field, other) in changes {
            let mut m = sent.last().unwrap().clone();
            m.id = other.id;
            m.timestamp_ms = other.timestamp_ms;
            match field {
                0 => m.source = other.source,
                1 => m.destination = other.destination,
                2 => m.kind = other.kind,
                3 => m.headers = other.headers,
                4 => m.priority = other.priority,
                5 => m.ttl = other.ttl,
                6 => m.correlation_id = other.correlation_id,
                7 => m.sequence = other.sequence,
                8 => m.payload = other.payload,
                _ => {} // the same middle again
            }
            sent.push(m);
        }
        let (mut tx, mut rx) = (codec(1 << 20), codec(1 << 20));
        let mut buf = BytesMut::new();
        for m in &sent {
            tx.encode_into(m, &mut buf).unwrap();
        }
        for m in &sent {
            prop_assert_eq!(&rx.decode_from(&mut buf).unwrap().unwrap(), m);
        }
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn hand_written_encoder_matches_rmp_serde(m in arb_message()) {
        let (mut fast, mut reference) = (BytesMut::new(), BytesMut::new());
        hivewire_codec::encode_envelope(&m, &mut fast).unwrap();
        hivewire_codec::encode_envelope_serde(&m, &mut reference).unwrap();
        prop_assert_eq!(fast, reference);
    }

    #[test]
    fn hand_written_decoder_matches_rmp_serde(m in arb_message()) {
        let mut buf = BytesMut::new();
        hivewire_codec::encode_envelope(&m, &mut buf).unwrap();
        let bytes = buf.freeze();
        let fast = hivewire_codec::decode_envelope(bytes.clone()).unwrap();
        let reference = hivewire_codec::decode_envelope_serde(bytes).unwrap();
        prop_assert_eq!(&fast, &reference);
        prop_assert_eq!(fast, m);
    }

    #[test]
    fn truncated_or_garbled_envelopes_decode_the_same_both_ways(m in arb_message(), cut in any::<prop::sample::Index>(), flip in any::<u8>()) {
        let mut buf = BytesMut::new();
        hivewire_codec::encode_envelope(&m, &mut buf).unwrap();
        let mut v = buf.to_vec();
        let i = cut.index(v.len());
        v[i] ^= flip | 1;
        for candidate in [Bytes::from(v.clone()), Bytes::from(v[..i].to_vec())] {
            let fast = hivewire_codec::decode_envelope(candidate.clone()).ok();
            let reference = hivewire_codec::decode_envelope_serde(candidate).ok();
            // The fast path never accepts what the reference rejects, nor reads it differently.
            if let Some(f) = fast {
                prop_assert_eq!(Some(f), reference);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_or_exceed_the_limit(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut c = FrameCodec::new(CodecConfig { max_message_size: 256, accept_gzip: true, accept_zstd: true, ..CodecConfig::default() });
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..8 {
            match c.decode_from(&mut buf) {
                Ok(Some(m)) => prop_assert!(m.payload.len() <= 256),
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn arbitrary_bodies_after_a_valid_header_never_panic(flags in 0u8..3, body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut c = FrameCodec::new(CodecConfig { max_message_size: 256, accept_gzip: true, accept_zstd: true, ..CodecConfig::default() });
        let mut buf = header(flags, body.len() as u32);
        buf.put_slice(&body);
        if let Ok(Some(m)) = c.decode_from(&mut buf) {
            prop_assert!(m.payload.len() <= 256);
        }
    }

    /// Just over the threshold, compression may or may not pay off; either way the frame
    /// round-trips and the flag tells the truth.
    #[test]
    fn threshold_edge(extra in 1usize..64, fill in any::<u8>(), algo in prop_oneof![Just(Compression::Gzip), Just(Compression::Zstd)]) {
        let probe = event_with(0);
        let mut tmp = BytesMut::new();
        hivewire_codec::encode_envelope(&probe, &mut tmp).unwrap();
        let base = tmp.len();
        let threshold = 256usize;
        // payload so that the envelope is threshold + extra bytes long (bin8/bin16 header: 2-3 bytes)
        let payload_len = threshold + extra - base + 2;
        let m = event_with(0).with_payload_bytes(Bytes::from(vec![fill; payload_len]));
        let mut c = all_accepting(algo, threshold);
        let mut buf = BytesMut::new();
        c.encode_into(&m, &mut buf).unwrap();
        let body_len = buf.len() - 8;
        if buf[3] != 0 {
            prop_assert!(body_len < threshold + extra + 1, "compressed form must be smaller");
        }
        prop_assert_eq!(c.decode_from(&mut buf).unwrap().unwrap(), m);
    }
}

#[test]
fn decoded_payload_shares_the_frame_memory() {
    let mut c = codec(1 << 20);
    let mut buf = BytesMut::new();
    c.encode_into(&event_with(4096), &mut buf).unwrap();
    let range = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let m = c.decode_from(&mut buf).unwrap().unwrap();
    let p = m.payload.as_ptr() as usize;
    assert!(range.contains(&p), "payload was copied out of the frame buffer");
    assert_eq!(m.payload.len(), 4096);
}

#[test]
fn split_encoding_checks_the_limits_like_a_whole_one() {
    let mut c = codec(20_000);
    let mut buf = BytesMut::new();
    assert!(c.encode_split(&event_with(20_000), &mut buf).unwrap());
    assert!(buf.len() < 200, "the payload's bytes are left out");
    let announced = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
    assert_eq!(announced, buf.len() - HEADER_LEN + 20_000, "the header counts the payload left out");
    let mut more = BytesMut::new();
    assert!(matches!(
        c.encode_split(&event_with(20_001), &mut more),
        Err(CodecError::MessageTooLarge { size: 20_001, max: 20_000 })
    ));
    assert!(more.is_empty(), "nothing is written for a refused message");
}

/// Ids longer than the 23 bytes held inline live in an allocation: a link's decoder hands out
/// one shared allocation for a repeated id (short ids are copies, allocating nothing).
#[test]
fn decoded_agent_ids_share_one_allocation_per_link_and_follow_changes() {
    let mut c = codec(1 << 20);
    let mut buf = BytesMut::new();
    let long = |s: &str| format!("{s}-0123456789abcdef0123");
    let from = |src: &str, dst: &str| {
        let mut m = event_with(3);
        m.source = long(src).into();
        m.destination = Some(long(dst).into());
        m
    };
    for m in [from("alpha", "hub"), from("alpha", "hub"), from("beta", "hub"), from("alpha", "hubx")] {
        c.encode_into(&m, &mut buf).unwrap();
    }
    let got: Vec<Message> = (0..4).map(|_| c.decode_from(&mut buf).unwrap().unwrap()).collect();
    let names: Vec<(String, String)> =
        got.iter().map(|m| (m.source.to_string(), m.destination.as_ref().unwrap().to_string())).collect();
    let want: Vec<(String, String)> =
        [("alpha", "hub"), ("alpha", "hub"), ("beta", "hub"), ("alpha", "hubx")]
            .iter()
            .map(|(s, d)| (long(s), long(d)))
            .collect();
    assert_eq!(names, want);
    assert!(got[0].source.is_shared());
    assert!(std::ptr::eq(got[0].source.as_str(), got[1].source.as_str()), "a repeated source is shared");
    assert!(std::ptr::eq(
        got[0].destination.as_ref().unwrap().as_str(),
        got[2].destination.as_ref().unwrap().as_str()
    ));
    assert!(
        !std::ptr::eq(got[0].source.as_str(), got[3].source.as_str()),
        "the cache holds only the last id"
    );
}

#[test]
fn hand_written_codec_matches_rmp_serde_at_every_length_boundary() {
    // Each MessagePack length class of strings, maps and binaries, on both sides of its edge.
    for len in [0usize, 31, 32, 255, 256, 65_535, 65_536] {
        for entries in [0usize, 15, 16] {
            let mut m = event_with(len);
            m.kind = MessageType::Request { method: "m".repeat(len).into() };
            m.source = "s".repeat(len.min(300)).as_str().into();
            m.headers = (0..entries).map(|i| (format!("k{i}"), "v".repeat(len.min(1000)))).collect();
            m.id = len as u64 * 65_537;
            let (mut fast, mut reference) = (BytesMut::new(), BytesMut::new());
            hivewire_codec::encode_envelope(&m, &mut fast).unwrap();
            hivewire_codec::encode_envelope_serde(&m, &mut reference).unwrap();
            assert_eq!(fast, reference, "encoding differs at length {len}, {entries} headers");
            let back = hivewire_codec::decode_envelope(fast.freeze()).unwrap();
            assert_eq!(back, m);
        }
    }
}

/// `decode_in_place` takes exactly one whole frame: one byte short or one byte more is a typed
/// error, as is a payload past the limit (the limit itself is fine) or a foreign frame.
#[test]
fn a_frame_read_in_place_must_be_exactly_one_frame_within_the_limits() {
    let mut c = codec(1000);
    let mut buf = BytesMut::new();
    c.encode_into(&event_with(1000), &mut buf).unwrap();
    let frame = buf.to_vec();
    match c.decode_in_place(&frame).unwrap() {
        InPlace::Lent { payload, .. } => assert_eq!(payload.len(), 1000),
        InPlace::Copied(_) => panic!("an uncompressed frame was copied"),
    }
    let n = frame.len();
    for bad in [&frame[..n - 1], &frame[..HEADER_LEN - 1], &[frame.as_slice(), &[0]].concat()[..]] {
        match c.decode_in_place(bad) {
            Err(CodecError::FrameLength { expected, actual }) => {
                assert_eq!(actual, bad.len());
                assert_eq!(expected, if bad.len() < HEADER_LEN { HEADER_LEN } else { n });
            }
            other => panic!("{} bytes: expected FrameLength, got {other:?}", bad.len()),
        }
    }
    let mut small = codec(999);
    assert!(matches!(small.decode_in_place(&frame), Err(CodecError::FrameTooLarge { size: 1000, max: 999 })));
    let mut foreign = frame.clone();
    foreign[0] = b'X';
    assert!(matches!(c.decode_in_place(&foreign), Err(CodecError::BadMagic(_))));
}

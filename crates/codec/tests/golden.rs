//! Golden vectors: fixed messages and their exact frames, also shown in docs/WIRE.md. An
//! accidental change to the wire format fails here.

use bytes::{Bytes, BytesMut};
use hivewire_codec::{CodecConfig, FrameCodec};
use hivewire_protocol::{ControlOperation, Message, MessageType, Metadata, ProtocolVersion};

fn fixed(mut m: Message, id: u64) -> Message {
    m.id = id;
    m.timestamp_ms = 1_700_000_000_000;
    m
}

fn hello() -> Message {
    let mut metadata = Metadata::new();
    metadata.insert("token".into(), "s3cret".into());
    fixed(
        Message::control(
            "agent-1",
            ControlOperation::Hello {
                version: ProtocolVersion::new(1, 0),
                capabilities: vec!["pubsub".into(), "compression.zstd".into()],
                metadata,
            },
        ),
        1,
    )
}

fn request() -> Message {
    let mut m = fixed(Message::request("agent-1", "echo", &serde_json::json!({"n": 42})).unwrap(), 2)
        .with_destination("hub")
        .with_header("trace", "t1");
    m.sequence = 0;
    m
}

fn response() -> Message {
    let req = request();
    let mut m = fixed(Message::response_bytes("hub", &req, Bytes::from_static(&[0x2a])), 3);
    m.ttl = 7;
    m
}

fn event() -> Message {
    fixed(Message::event("agent-1", "sensors.arm.temp", &41.5f64).unwrap(), 4)
}

fn heartbeat() -> Message {
    fixed(Message::new("hub", MessageType::Heartbeat), 5).with_priority(255)
}

fn frame(m: &Message) -> String {
    let mut codec = FrameCodec::new(CodecConfig::default());
    let mut buf = BytesMut::new();
    codec.encode_into(m, &mut buf).unwrap();
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

type Vector = (&'static str, fn() -> Message, &'static str);

const GOLDEN: &[Vector] = &[
    ("hello", hello, "48570100000000579b01c0a76167656e742d31c081a7436f6e74726f6c81a548656c6c6f9392010092a6707562737562b0636f6d7072657373696f6e2e7a73746481a5746f6b656ea673336372657480ccff08cf0000018bcfe5680000c400"),
    ("request", request, "485701000000003b9b02c0a76167656e742d31a368756281a75265717565737491a46563686f81a57472616365a27431cc8008cf0000018bcfe5680000c40481a16e2a"),
    ("response", response, "485701000000002e9b0302a3687562a76167656e742d3181a8526573706f6e736591a24f6b80cc8007cf0000018bcfe5680000c4012a"),
    ("event", event, "485701000000003e9b04c0a76167656e742d31c081a54576656e7491b073656e736f72732e61726d2e74656d7080cc8008cf0000018bcfe5680000c409cb4044c00000000000"),
    ("heartbeat", heartbeat, "48570100000000229b05c0a3687562c0a948656172746265617480ccff08cf0000018bcfe5680000c400"),
];

#[test]
fn frames_match_the_golden_vectors() {
    let mut bad = Vec::new();
    for (name, make, want) in GOLDEN {
        let got = frame(&make());
        if got != *want {
            bad.push(format!("{name}: {got}"));
        }
    }
    assert!(bad.is_empty(), "wire format changed:\n{}", bad.join("\n"));
}

#[test]
fn golden_vectors_decode_back() {
    for (name, make, want) in GOLDEN {
        let bytes: Vec<u8> =
            (0..want.len()).step_by(2).map(|i| u8::from_str_radix(&want[i..i + 2], 16).unwrap()).collect();
        let mut buf = BytesMut::from(&bytes[..]);
        let mut codec = FrameCodec::new(CodecConfig::default());
        let got = codec.decode_from(&mut buf).unwrap().unwrap_or_else(|| panic!("{name}: incomplete"));
        assert_eq!(got, make(), "{name}");
        assert!(buf.is_empty());
    }
}

//! A hand-written envelope encoder producing exactly the bytes rmp-serde produces for a
//! `Message` (checked by a property test and the golden frames), without serde's generic
//! machinery on the hot path.

use bytes::{BufMut, BytesMut};
use hivewire_protocol::{
    ControlOperation, Message, MessageType, ProtocolVersion, RejectReason, ResponseStatus,
};
use rmp::encode::{
    write_array_len, write_bin, write_bin_len, write_map_len, write_nil, write_str, write_uint,
    ValueWriteError,
};

type W<'a> = bytes::buf::Writer<&'a mut BytesMut>;
type R = Result<(), ValueWriteError>;

fn version(w: &mut W<'_>, v: &ProtocolVersion) -> R {
    write_array_len(w, 2)?;
    write_uint(w, u64::from(v.major))?;
    write_uint(w, u64::from(v.minor))?;
    Ok(())
}

/// `{name: [fields…]}` header of a struct variant.
fn variant(w: &mut W<'_>, name: &str, fields: u32) -> R {
    write_map_len(w, 1)?;
    write_str(w, name)?;
    write_array_len(w, fields)?;
    Ok(())
}

/// `{name: value}` header of a newtype variant.
fn newtype(w: &mut W<'_>, name: &str) -> R {
    write_map_len(w, 1)?;
    write_str(w, name)?;
    Ok(())
}

fn str_map(w: &mut W<'_>, m: &std::collections::BTreeMap<String, String>) -> R {
    write_map_len(w, u32::try_from(m.len()).map_err(|_| too_long())?)?;
    for (k, v) in m {
        write_str(w, k)?;
        write_str(w, v)?;
    }
    Ok(())
}

fn too_long() -> ValueWriteError {
    ValueWriteError::InvalidMarkerWrite(std::io::Error::other("collection longer than u32::MAX"))
}

fn hello_like(
    w: &mut W<'_>,
    name: &str,
    v: &ProtocolVersion,
    caps: &[String],
    meta: &std::collections::BTreeMap<String, String>,
) -> R {
    variant(w, name, 3)?;
    version(w, v)?;
    write_array_len(w, u32::try_from(caps.len()).map_err(|_| too_long())?)?;
    for c in caps {
        write_str(w, c)?;
    }
    str_map(w, meta)
}

fn control(w: &mut W<'_>, op: &ControlOperation) -> R {
    match op {
        ControlOperation::Hello { version: v, capabilities, metadata } => {
            hello_like(w, "Hello", v, capabilities, metadata)
        }
        ControlOperation::HelloAck { version: v, capabilities, metadata } => {
            hello_like(w, "HelloAck", v, capabilities, metadata)
        }
        ControlOperation::Reject { reason } => {
            variant(w, "Reject", 1)?;
            match reason {
                RejectReason::VersionMismatch { ours, theirs } => {
                    variant(w, "VersionMismatch", 2)?;
                    version(w, ours)?;
                    version(w, theirs)
                }
                RejectReason::DuplicateAgentId(id) => {
                    newtype(w, "DuplicateAgentId")?;
                    write_str(w, id)
                }
                RejectReason::Unauthorized(why) => {
                    newtype(w, "Unauthorized")?;
                    write_str(w, why)
                }
                RejectReason::Malformed(why) => {
                    newtype(w, "Malformed")?;
                    write_str(w, why)
                }
                RejectReason::Overloaded => write_str(w, "Overloaded"),
            }
        }
        ControlOperation::Goodbye { reason } => {
            variant(w, "Goodbye", 1)?;
            write_str(w, reason)
        }
        ControlOperation::Subscribe { pattern } => {
            variant(w, "Subscribe", 1)?;
            write_str(w, pattern)
        }
        ControlOperation::Unsubscribe { pattern } => {
            variant(w, "Unsubscribe", 1)?;
            write_str(w, pattern)
        }
    }
}

fn kind(w: &mut W<'_>, k: &MessageType) -> R {
    match k {
        MessageType::Request { method } => {
            variant(w, "Request", 1)?;
            write_str(w, method)
        }
        MessageType::Response { status } => {
            variant(w, "Response", 1)?;
            match status {
                ResponseStatus::Ok => write_str(w, "Ok"),
                ResponseStatus::Error { code, message } => {
                    variant(w, "Error", 2)?;
                    write_uint(w, u64::from(*code))?;
                    write_str(w, message)
                }
            }
        }
        MessageType::Event { topic } => {
            variant(w, "Event", 1)?;
            write_str(w, topic)
        }
        MessageType::Broadcast { topic } => {
            variant(w, "Broadcast", 1)?;
            write_str(w, topic)
        }
        MessageType::Heartbeat => write_str(w, "Heartbeat"),
        MessageType::Control(op) => {
            newtype(w, "Control")?;
            control(w, op)
        }
    }
}

fn opt_uint(w: &mut W<'_>, v: Option<u64>) -> R {
    match v {
        Some(x) => write_uint(w, x).map(|_| ()),
        None => write_nil(w).map_err(ValueWriteError::InvalidMarkerWrite),
    }
}

/// Appends the MessagePack envelope of `msg` to `dst`.
pub(crate) fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), ValueWriteError> {
    encode_head(msg, dst, true)
}

/// Appends the envelope of `msg` to `dst`; with `with_payload` false, everything but the
/// payload's bytes, which the caller then sends right after (the envelope ends with them).
pub(crate) fn encode_head(
    msg: &Message,
    dst: &mut BytesMut,
    with_payload: bool,
) -> Result<(), ValueWriteError> {
    dst.reserve(96 + if with_payload { msg.payload.len() } else { 0 });
    let w = &mut dst.writer();
    write_array_len(w, 11)?;
    write_uint(w, msg.id)?;
    opt_uint(w, msg.correlation_id)?;
    write_str(w, &msg.source)?;
    match &msg.destination {
        Some(d) => write_str(w, d)?,
        None => write_nil(w).map_err(ValueWriteError::InvalidMarkerWrite)?,
    }
    kind(w, &msg.kind)?;
    str_map(w, &msg.headers)?;
    write_uint(w, u64::from(msg.priority))?;
    write_uint(w, u64::from(msg.ttl))?;
    write_uint(w, msg.timestamp_ms)?;
    write_uint(w, msg.sequence)?;
    if with_payload {
        write_bin(w, &msg.payload)?;
    } else {
        write_bin_len(w, u32::try_from(msg.payload.len()).map_err(|_| too_long())?)?;
    }
    Ok(())
}

// ----- decoding --------------------------------------------------------------------------------

use bytes::Bytes;
use hivewire_protocol::{AgentId, Headers, Metadata};
use rmp::decode::{read_array_len, read_bin_len, read_int, read_map_len, read_str_len};

/// A cursor over the envelope; every read returns `None` on anything unexpected, and the
/// caller then falls back to rmp-serde (which also produces the error message).
struct Rd<'a> {
    buf: &'a [u8],
}

impl<'a> Rd<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    fn uint(&mut self) -> Option<u64> {
        read_int::<u64, _>(&mut self.buf).ok()
    }

    fn small<T: TryFrom<u64>>(&mut self) -> Option<T> {
        T::try_from(self.uint()?).ok()
    }

    fn is_nil(&mut self) -> bool {
        if self.peek() == Some(0xc0) {
            self.buf = &self.buf[1..];
            true
        } else {
            false
        }
    }

    fn array(&mut self, want: u32) -> Option<()> {
        (read_array_len(&mut self.buf).ok()? == want).then_some(())
    }

    fn str(&mut self) -> Option<&'a str> {
        let len = read_str_len(&mut self.buf).ok()? as usize;
        if self.buf.len() < len {
            return None;
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        std::str::from_utf8(s).ok()
    }

    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    fn str_map(&mut self) -> Option<Headers> {
        let n = read_map_len(&mut self.buf).ok()?;
        let mut m = Metadata::new();
        for _ in 0..n {
            let k = self.string()?;
            let v = self.string()?;
            m.insert(k, v);
        }
        Some(m)
    }

    /// `{name: …}`: the variant name of a one-entry map.
    fn variant(&mut self) -> Option<&'a str> {
        (read_map_len(&mut self.buf).ok()? == 1).then_some(())?;
        self.str()
    }

    fn version(&mut self) -> Option<ProtocolVersion> {
        self.array(2)?;
        Some(ProtocolVersion::new(self.small()?, self.small()?))
    }

    fn hello_fields(&mut self) -> Option<(ProtocolVersion, Vec<String>, Metadata)> {
        self.array(3)?;
        let v = self.version()?;
        let n = read_array_len(&mut self.buf).ok()?;
        let mut caps = Vec::with_capacity(n.min(64) as usize);
        for _ in 0..n {
            caps.push(self.string()?);
        }
        Some((v, caps, self.str_map()?))
    }

    fn one_string(&mut self) -> Option<String> {
        self.array(1)?;
        self.string()
    }

    fn control(&mut self) -> Option<ControlOperation> {
        Some(match self.variant()? {
            "Hello" => {
                let (version, capabilities, metadata) = self.hello_fields()?;
                ControlOperation::Hello { version, capabilities, metadata }
            }
            "HelloAck" => {
                let (version, capabilities, metadata) = self.hello_fields()?;
                ControlOperation::HelloAck { version, capabilities, metadata }
            }
            "Reject" => {
                self.array(1)?;
                let reason = if self
                    .peek()
                    .is_some_and(|m| (0xa0..=0xbf).contains(&m) || (0xd9..=0xdb).contains(&m))
                {
                    match self.str()? {
                        "Overloaded" => RejectReason::Overloaded,
                        _ => return None,
                    }
                } else {
                    match self.variant()? {
                        "VersionMismatch" => {
                            self.array(2)?;
                            RejectReason::VersionMismatch { ours: self.version()?, theirs: self.version()? }
                        }
                        "DuplicateAgentId" => RejectReason::DuplicateAgentId(AgentId::new(self.str()?)),
                        "Unauthorized" => RejectReason::Unauthorized(self.string()?),
                        "Malformed" => RejectReason::Malformed(self.string()?),
                        _ => return None,
                    }
                };
                ControlOperation::Reject { reason }
            }
            "Goodbye" => ControlOperation::Goodbye { reason: self.one_string()? },
            "Subscribe" => ControlOperation::Subscribe { pattern: self.one_string()? },
            "Unsubscribe" => ControlOperation::Unsubscribe { pattern: self.one_string()? },
            _ => return None,
        })
    }

    fn kind(&mut self) -> Option<MessageType> {
        if self.peek().is_some_and(|m| (0xa0..=0xbf).contains(&m)) {
            return (self.str()? == "Heartbeat").then_some(MessageType::Heartbeat);
        }
        Some(match self.variant()? {
            "Request" => MessageType::Request { method: self.one_string()? },
            "Event" => MessageType::Event { topic: self.one_string()? },
            "Broadcast" => MessageType::Broadcast { topic: self.one_string()? },
            "Response" => {
                self.array(1)?;
                let status = if self.peek().is_some_and(|m| (0xa0..=0xbf).contains(&m)) {
                    (self.str()? == "Ok").then_some(ResponseStatus::Ok)?
                } else {
                    (self.variant()? == "Error").then_some(())?;
                    self.array(2)?;
                    ResponseStatus::Error { code: self.small()?, message: self.string()? }
                };
                MessageType::Response { status }
            }
            "Control" => MessageType::Control(self.control()?),
            _ => return None,
        })
    }
}

/// The agent ids a link's decoder saw last: a link carries the same few ids over and over
/// (its peer's as source, ours as destination), so a decoded id that matches shares the
/// cached allocation instead of making a new one (and the receiver frees nothing for it).
#[derive(Debug, Default, Clone)]
pub struct IdCache {
    source: Option<AgentId>,
    destination: Option<AgentId>,
}

fn cached(slot: &mut Option<AgentId>, s: &str) -> AgentId {
    match slot {
        Some(id) if id.as_str() == s => id.clone(),
        _ => {
            let id = AgentId::new(s);
            *slot = Some(id.clone());
            id
        }
    }
}

/// Decodes an envelope laid out as [`encode`] writes it, with the payload sliced out of `src`
/// (no copy). `None` for anything else (the caller falls back to rmp-serde).
pub(crate) fn decode(src: &Bytes) -> Option<Message> {
    decode_cached(src, &mut IdCache::default())
}

/// [`decode`] sharing agent ids through `ids`.
pub(crate) fn decode_cached(src: &Bytes, ids: &mut IdCache) -> Option<Message> {
    let mut rd = Rd { buf: &src[..] };
    rd.array(11)?;
    let id = rd.uint()?;
    let correlation_id = if rd.is_nil() { None } else { Some(rd.uint()?) };
    let source = cached(&mut ids.source, rd.str()?);
    let destination = if rd.is_nil() { None } else { Some(cached(&mut ids.destination, rd.str()?)) };
    let kind = rd.kind()?;
    let headers = rd.str_map()?;
    let priority = rd.small()?;
    let ttl = rd.small()?;
    let timestamp_ms = rd.uint()?;
    let sequence = rd.uint()?;
    let len = read_bin_len(&mut rd.buf).ok()? as usize;
    if rd.buf.len() != len {
        return None; // short, or trailing bytes
    }
    let payload = src.slice_ref(rd.buf);
    Some(Message {
        id,
        correlation_id,
        source,
        destination,
        kind,
        headers,
        priority,
        ttl,
        timestamp_ms,
        sequence,
        payload,
    })
}

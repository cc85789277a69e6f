//! A hand-written envelope encoder producing exactly the bytes rmp-serde produces for a
//! `Message` (checked by a property test and the golden frames), without serde's generic
//! machinery on the hot path.

use bytes::{BufMut, BytesMut};
use hivewire_protocol::{
    ControlOperation, Message, MessageType, ProtocolVersion, RejectReason, ResponseStatus,
};
use rmp::encode::ValueWriteError;

type R = Result<(), ValueWriteError>;

/// Where the encoder appends bytes: the frame buffer itself, or a fixed scratch on the stack
/// that the common (small) envelope is built in first, one store per byte with no capacity
/// check, and then copied into the frame buffer in one go.
trait Sink {
    fn put_u8(&mut self, b: u8) -> R;
    fn put_slice(&mut self, s: &[u8]) -> R;
    /// Bytes appended so far.
    fn written(&self) -> usize;
    /// The bytes appended since `written()` returned `start`.
    fn since(&self, start: usize) -> &[u8];
    #[inline(always)]
    fn put_u16(&mut self, v: u16) -> R {
        self.put_slice(&v.to_be_bytes())
    }
    #[inline(always)]
    fn put_u32(&mut self, v: u32) -> R {
        self.put_slice(&v.to_be_bytes())
    }
    #[inline(always)]
    fn put_u64(&mut self, v: u64) -> R {
        self.put_slice(&v.to_be_bytes())
    }
}

impl Sink for BytesMut {
    #[inline(always)]
    fn put_u8(&mut self, b: u8) -> R {
        BufMut::put_u8(self, b);
        Ok(())
    }
    #[inline(always)]
    fn written(&self) -> usize {
        self.len()
    }
    #[inline(always)]
    fn since(&self, start: usize) -> &[u8] {
        &self[start..]
    }
    #[inline(always)]
    fn put_slice(&mut self, s: &[u8]) -> R {
        self.extend_from_slice(s);
        Ok(())
    }
}

/// Room for the head of every envelope whose ids, topic and headers are short; a longer one
/// overflows the scratch and is encoded straight into the frame buffer instead.
const SCRATCH: usize = 256;

struct Scratch {
    buf: [u8; SCRATCH],
    n: usize,
}

impl Scratch {
    fn new() -> Self {
        Scratch { buf: [0; SCRATCH], n: 0 }
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.n]
    }
}

impl Sink for Scratch {
    #[inline(always)]
    fn written(&self) -> usize {
        self.n
    }
    #[inline(always)]
    fn since(&self, start: usize) -> &[u8] {
        &self.buf[start..self.n]
    }
    #[inline(always)]
    fn put_u8(&mut self, b: u8) -> R {
        match self.buf.get_mut(self.n) {
            Some(slot) => {
                *slot = b;
                self.n += 1;
                Ok(())
            }
            None => Err(too_long()),
        }
    }
    #[inline(always)]
    fn put_slice(&mut self, s: &[u8]) -> R {
        let end = self.n + s.len(); // both below SCRATCH + isize::MAX: no overflow
        match self.buf.get_mut(self.n..end) {
            Some(dst) => {
                dst.copy_from_slice(s);
                self.n = end;
                Ok(())
            }
            None => Err(too_long()),
        }
    }
}

#[inline]
fn len32(n: usize) -> Result<u32, ValueWriteError> {
    u32::try_from(n).map_err(|_| too_long())
}

#[inline]
fn write_uint<S: Sink>(w: &mut S, v: u64) -> R {
    if v < 128 {
        w.put_u8(v as u8)
    } else if v < 256 {
        w.put_slice(&[0xcc, v as u8])
    } else if v < 65_536 {
        w.put_u8(0xcd)?;
        w.put_u16(v as u16)
    } else if v <= u64::from(u32::MAX) {
        w.put_u8(0xce)?;
        w.put_u32(v as u32)
    } else {
        w.put_u8(0xcf)?;
        w.put_u64(v)
    }
}

#[inline]
fn write_nil<S: Sink>(w: &mut S) -> R {
    w.put_u8(0xc0)
}

/// A length in the most compact of a type's forms: `fix` (up to `fix_max`, the length in the
/// marker's low bits), an 8-bit form, then 16 and 32 bits.
#[inline(always)]
fn write_len<S: Sink>(w: &mut S, n: u32, fix: Option<(u32, u8)>, m8: Option<u8>, m16: u8, m32: u8) -> R {
    match (fix, m8) {
        (Some((max, base)), _) if n <= max => w.put_u8(base | n as u8),
        (_, Some(m8)) if n < 256 => w.put_slice(&[m8, n as u8]),
        _ if n < 65_536 => {
            w.put_u8(m16)?;
            w.put_u16(n as u16)
        }
        _ => {
            w.put_u8(m32)?;
            w.put_u32(n)
        }
    }
}

#[inline]
fn write_array_len<S: Sink>(w: &mut S, n: u32) -> R {
    write_len(w, n, Some((15, 0x90)), None, 0xdc, 0xdd)
}

#[inline]
fn write_map_len<S: Sink>(w: &mut S, n: u32) -> R {
    write_len(w, n, Some((15, 0x80)), None, 0xde, 0xdf)
}

#[inline]
fn write_str<S: Sink>(w: &mut S, s: &str) -> R {
    write_len(w, len32(s.len())?, Some((31, 0xa0)), Some(0xd9), 0xda, 0xdb)?;
    w.put_slice(s.as_bytes())
}

#[inline]
fn write_bin_len<S: Sink>(w: &mut S, n: u32) -> R {
    write_len(w, n, None, Some(0xc4), 0xc5, 0xc6)
}

#[inline]
fn version<S: Sink>(w: &mut S, v: &ProtocolVersion) -> R {
    write_array_len(w, 2)?;
    write_uint(w, u64::from(v.major))?;
    write_uint(w, u64::from(v.minor))?;
    Ok(())
}

/// `{name: [fields…]}` header of a struct variant.
#[inline]
fn variant<S: Sink>(w: &mut S, name: &str, fields: u32) -> R {
    write_map_len(w, 1)?;
    write_str(w, name)?;
    write_array_len(w, fields)?;
    Ok(())
}

/// `{name: value}` header of a newtype variant.
#[inline]
fn newtype<S: Sink>(w: &mut S, name: &str) -> R {
    write_map_len(w, 1)?;
    write_str(w, name)?;
    Ok(())
}

fn str_map<S: Sink>(w: &mut S, m: &std::collections::BTreeMap<String, String>) -> R {
    write_map_len(w, len32(m.len())?)?;
    for (k, v) in m {
        write_str(w, k)?;
        write_str(w, v)?;
    }
    Ok(())
}

fn too_long() -> ValueWriteError {
    ValueWriteError::InvalidMarkerWrite(std::io::Error::other("collection longer than u32::MAX"))
}

fn hello_like<S: Sink>(
    w: &mut S,
    name: &str,
    v: &ProtocolVersion,
    caps: &[String],
    meta: &std::collections::BTreeMap<String, String>,
) -> R {
    variant(w, name, 3)?;
    version(w, v)?;
    write_array_len(w, len32(caps.len())?)?;
    for c in caps {
        write_str(w, c)?;
    }
    str_map(w, meta)
}

fn control<S: Sink>(w: &mut S, op: &ControlOperation) -> R {
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

fn kind<S: Sink>(w: &mut S, k: &MessageType) -> R {
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

#[inline]
fn opt_uint<S: Sink>(w: &mut S, v: Option<u64>) -> R {
    match v {
        Some(x) => write_uint(w, x),
        None => write_nil(w),
    }
}

/// Appends the MessagePack envelope of `msg` to `dst`.
pub(crate) fn encode(msg: &Message, dst: &mut BytesMut) -> Result<(), ValueWriteError> {
    encode_head(msg, dst, true, None)
}

/// Appends the envelope of `msg` to `dst`; with `with_payload` false, everything but the
/// payload's bytes, which the caller then sends right after (the envelope ends with them).
/// With a `cache` (a link's encoder), middle fields equal to the last envelope's are copied
/// from its bytes instead of encoded again.
pub(crate) fn encode_head(
    msg: &Message,
    dst: &mut BytesMut,
    with_payload: bool,
    mut cache: Option<&mut Option<Box<Middle>>>,
) -> Result<(), ValueWriteError> {
    let payload = if with_payload { msg.payload.len() } else { 0 };
    let mut scratch = Scratch::new();
    if head(&mut scratch, msg, cache.as_deref_mut()).is_ok() {
        // The common case: one copy of the head, then the payload.
        dst.reserve(scratch.n + payload);
        dst.extend_from_slice(scratch.bytes());
    } else {
        // A head too long for the scratch (long ids, topic or headers): straight into `dst`,
        // which also reports a collection too long for MessagePack.
        let start = dst.len();
        dst.reserve(SCRATCH + payload);
        if let Err(e) = head(dst, msg, cache) {
            dst.truncate(start);
            return Err(e);
        }
    }
    if with_payload {
        dst.extend_from_slice(&msg.payload);
    }
    Ok(())
}

/// Everything of the envelope up to and including the payload's bin length.
#[inline(always)]
fn head<S: Sink>(w: &mut S, msg: &Message, cache: Option<&mut Option<Box<Middle>>>) -> R {
    write_array_len(w, 11)?;
    write_uint(w, msg.id)?;
    opt_uint(w, msg.correlation_id)?;
    match cache {
        Some(slot) => match slot {
            Some(m) if m.is(msg) => {
                #[cfg(test)]
                tests::ENCODER_HITS.with(|h| h.set(h.get() + 1));
                w.put_slice(m.bytes())?
            }
            _ => {
                let start = w.written();
                middle(w, msg)?;
                if msg.headers.is_empty() && !matches!(msg.kind, MessageType::Control(_)) {
                    let (src, dst) = (&msg.source, &msg.destination);
                    Middle::keep(slot, w.since(start), src, dst, &msg.kind, msg.priority, msg.ttl);
                }
            }
        },
        None => middle(w, msg)?,
    }
    write_uint(w, msg.timestamp_ms)?;
    write_uint(w, msg.sequence)?;
    write_bin_len(w, len32(msg.payload.len())?)
}

/// The fields between the correlation id and the timestamp.
#[inline(always)]
fn middle<S: Sink>(w: &mut S, msg: &Message) -> R {
    write_str(w, &msg.source)?;
    match &msg.destination {
        Some(d) => write_str(w, d)?,
        None => write_nil(w)?,
    }
    kind(w, &msg.kind)?;
    str_map(w, &msg.headers)?;
    write_uint(w, u64::from(msg.priority))?;
    write_uint(w, u64::from(msg.ttl))
}

// ----- decoding --------------------------------------------------------------------------------

use bytes::Bytes;
use hivewire_protocol::{AgentId, Headers, Metadata, Name};

/// A cursor over the envelope; every read returns `None` on anything unexpected, and the
/// caller then falls back to rmp-serde (which also produces the error message).
struct Rd<'a> {
    buf: &'a [u8],
}

impl<'a> Rd<'a> {
    fn peek(&self) -> Option<u8> {
        self.buf.first().copied()
    }

    /// The next byte.
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.buf.split_first()?;
        self.buf = rest;
        Some(b)
    }

    /// The next `N` bytes.
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.buf.split_first_chunk::<N>()?;
        self.buf = rest;
        Some(*head)
    }

    fn be16(&mut self) -> Option<u32> {
        Some(u32::from(u16::from_be_bytes(self.take()?)))
    }

    fn be32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take()?))
    }

    /// An unsigned integer in any of its encodings (a signed one falls back to rmp-serde).
    fn uint_raw(&mut self) -> Option<u64> {
        Some(match self.byte()? {
            b @ 0x00..=0x7f => u64::from(b),
            0xcc => u64::from(self.byte()?),
            0xcd => u64::from(self.be16()?),
            0xce => u64::from(self.be32()?),
            0xcf => u64::from_be_bytes(self.take()?),
            _ => return None,
        })
    }

    fn array_len(&mut self) -> Option<u32> {
        match self.byte()? {
            b @ 0x90..=0x9f => Some(u32::from(b & 0x0f)),
            0xdc => self.be16(),
            0xdd => self.be32(),
            _ => None,
        }
    }

    fn map_len(&mut self) -> Option<u32> {
        match self.byte()? {
            b @ 0x80..=0x8f => Some(u32::from(b & 0x0f)),
            0xde => self.be16(),
            0xdf => self.be32(),
            _ => None,
        }
    }

    fn str_len(&mut self) -> Option<u32> {
        match self.byte()? {
            b @ 0xa0..=0xbf => Some(u32::from(b & 0x1f)),
            0xd9 => self.byte().map(u32::from),
            0xda => self.be16(),
            0xdb => self.be32(),
            _ => None,
        }
    }

    fn bin_len(&mut self) -> Option<u32> {
        match self.byte()? {
            0xc4 => self.byte().map(u32::from),
            0xc5 => self.be16(),
            0xc6 => self.be32(),
            _ => None,
        }
    }

    fn uint(&mut self) -> Option<u64> {
        self.uint_raw()
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
        (self.array_len()? == want).then_some(())
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.raw_str()?).ok()
    }

    /// A MessagePack str's bytes, not yet validated as UTF-8: for comparing with known names
    /// and cached ids, where validating first would cost more than the comparison.
    fn raw_str(&mut self) -> Option<&'a [u8]> {
        let len = self.str_len()? as usize;
        if self.buf.len() < len {
            return None;
        }
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        Some(s)
    }

    fn string(&mut self) -> Option<String> {
        self.str().map(str::to_owned)
    }

    fn str_map(&mut self) -> Option<Metadata> {
        let n = self.map_len()?;
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
        (self.map_len()? == 1).then_some(())?;
        self.str()
    }

    fn version(&mut self) -> Option<ProtocolVersion> {
        self.array(2)?;
        Some(ProtocolVersion::new(self.small()?, self.small()?))
    }

    fn hello_fields(&mut self) -> Option<(ProtocolVersion, Vec<String>, Metadata)> {
        self.array(3)?;
        let v = self.version()?;
        let n = self.array_len()?;
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

    /// `[name]`: a topic or method, shared with a recently decoded one when equal.
    fn one_name(&mut self, names: &mut Names) -> Option<Name> {
        self.array(1)?;
        names.get(self.raw_str()?)
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

    fn kind(&mut self, names: &mut Names) -> Option<MessageType> {
        if self.peek().is_some_and(|m| (0xa0..=0xbf).contains(&m)) {
            return (self.raw_str()? == b"Heartbeat").then_some(MessageType::Heartbeat);
        }
        // Variant names compared as bytes: a name that is not valid UTF-8 matches none of them.
        (self.map_len()? == 1).then_some(())?;
        Some(match self.raw_str()? {
            b"Request" => MessageType::Request { method: self.one_name(names)? },
            b"Event" => MessageType::Event { topic: self.one_name(names)? },
            b"Broadcast" => MessageType::Broadcast { topic: self.one_name(names)? },
            b"Response" => {
                self.array(1)?;
                let status = if self.peek().is_some_and(|m| (0xa0..=0xbf).contains(&m)) {
                    (self.raw_str()? == b"Ok").then_some(ResponseStatus::Ok)?
                } else {
                    (self.variant()? == "Error").then_some(())?;
                    self.array(2)?;
                    ResponseStatus::Error { code: self.small()?, message: self.string()? }
                };
                MessageType::Response { status }
            }
            b"Control" => MessageType::Control(self.control()?),
            _ => return None,
        })
    }
}

/// The agent ids and the topics (or methods) a link's decoder saw last: a link carries the same
/// few over and over (its peer's id as source, ours as destination, the topics of its streams),
/// so a decoded one that matches shares the cached allocation instead of making a new one (and
/// the receiver frees nothing for it).
#[derive(Debug, Default, Clone)]
pub struct IdCache {
    source: Option<AgentId>,
    destination: Option<AgentId>,
    names: Names,
    middle: Option<Box<Middle>>,
    /// Envelopes whose middle fields came from `middle`.
    #[cfg(test)]
    middle_hits: usize,
}

/// The longest run of middle fields [`Middle`] keeps (ids, topic and the rest of a typical
/// envelope take 20–70 bytes).
const MIDDLE_MAX: usize = 96;

/// The fields between the correlation id and the timestamp (source, destination, kind,
/// headers, priority, hop limit) of the last envelope a link encoded or decoded whose headers
/// were empty and that was not a control message, with their bytes: a link's messages mostly
/// repeat them (one peer, one destination, a few topics). An envelope whose bytes at that place
/// are equal is then decoded by one comparison instead of field by field; a message whose
/// fields are equal is encoded by copying the bytes.
#[derive(Debug, Clone)]
pub(crate) struct Middle {
    bytes: [u8; MIDDLE_MAX],
    len: usize,
    source: AgentId,
    destination: Option<AgentId>,
    kind: MessageType,
    priority: u8,
    ttl: u8,
}

impl Middle {
    /// Remembers these fields in `slot` (in place when it holds some already: a link whose
    /// envelopes alternate allocates nothing for it); forgets them when `used` is too long.
    fn keep(
        slot: &mut Option<Box<Middle>>,
        used: &[u8],
        source: &AgentId,
        destination: &Option<AgentId>,
        kind: &MessageType,
        priority: u8,
        ttl: u8,
    ) {
        if used.len() > MIDDLE_MAX {
            *slot = None;
            return;
        }
        let (source, destination, kind) = (source.clone(), destination.clone(), kind.clone());
        let m = match slot {
            Some(m) => {
                m.source = source;
                m.destination = destination;
                m.kind = kind;
                m.priority = priority;
                m.ttl = ttl;
                m
            }
            None => slot.insert(Box::new(Middle {
                bytes: [0; MIDDLE_MAX],
                len: 0,
                source,
                destination,
                kind,
                priority,
                ttl,
            })),
        };
        m.bytes[..used.len()].copy_from_slice(used);
        m.len = used.len();
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }

    /// True when `msg`'s middle fields are these (cheapest tests first).
    #[inline]
    fn is(&self, msg: &Message) -> bool {
        msg.priority == self.priority
            && msg.ttl == self.ttl
            && msg.headers.is_empty()
            && msg.source == self.source
            && msg.destination == self.destination
            && msg.kind == self.kind
    }
}

/// How many topics or methods a link's decoder remembers: a link usually interleaves a few
/// streams (a robot's odometry, IMU and commands), each of which should find its topic here.
const NAMES: usize = 4;

/// The last [`NAMES`] distinct topics or methods decoded, the oldest replaced first.
#[derive(Debug, Default, Clone)]
struct Names {
    slots: [Option<Name>; NAMES],
    next: usize,
}

impl Names {
    fn get(&mut self, s: &[u8]) -> Option<Name> {
        // Equal to one decoded before: valid UTF-8 without validating again.
        if let Some(hit) = self.slots.iter().flatten().find(|n| n.as_bytes() == s) {
            return Some(hit.clone());
        }
        let name = Name::new(std::str::from_utf8(s).ok()?);
        self.slots[self.next] = Some(name.clone());
        self.next = (self.next + 1) % NAMES;
        Some(name)
    }
}

/// A cheaply cloned string the decoder can cache and hand out again ([`AgentId`], [`Name`]).
trait Shared: Clone {
    fn bytes(&self) -> &[u8];
    fn make(s: &str) -> Self;
}

impl Shared for AgentId {
    fn bytes(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
    fn make(s: &str) -> Self {
        AgentId::new(s)
    }
}

fn cached<T: Shared>(slot: &mut Option<T>, s: &[u8]) -> Option<T> {
    match slot {
        // Equal to one decoded before: valid UTF-8 without validating again.
        Some(v) if v.bytes() == s => Some(v.clone()),
        _ => {
            let v = T::make(std::str::from_utf8(s).ok()?);
            *slot = Some(v.clone());
            Some(v)
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
    decode_fields(src, ids, |payload| src.slice_ref(payload))
}

/// Decodes every field of an envelope laid out as [`encode`] writes it but the payload, which
/// is left empty: returns the message and the offset in `src` where the payload begins (it runs
/// to the end of `src`).
pub(crate) fn decode_head(src: &[u8], ids: &mut IdCache) -> Option<(Message, usize)> {
    let mut at = src.len();
    let msg = decode_fields(src, ids, |payload| {
        at = src.len() - payload.len();
        Bytes::new()
    })?;
    Some((msg, at))
}

/// The decoder of both: `payload` makes the message's payload from its bytes in `src`. Inlined,
/// so that the message is built once where the caller returns it (a message is ~200 bytes).
#[inline(always)]
fn decode_fields(src: &[u8], ids: &mut IdCache, payload: impl FnOnce(&[u8]) -> Bytes) -> Option<Message> {
    let mut rd = Rd { buf: src };
    rd.array(11)?;
    let id = rd.uint()?;
    let correlation_id = if rd.is_nil() { None } else { Some(rd.uint()?) };
    let (source, destination, kind, headers, priority, ttl) = match &ids.middle {
        // The same bytes as the last envelope's: the same fields (MessagePack is a prefix code,
        // so equal bytes from here decode to equal values and end at the same place).
        Some(m) if rd.buf.starts_with(m.bytes()) => {
            rd.buf = &rd.buf[m.bytes().len()..];
            #[cfg(test)]
            {
                ids.middle_hits += 1;
            }
            (m.source.clone(), m.destination.clone(), m.kind.clone(), Headers::new(), m.priority, m.ttl)
        }
        _ => {
            let start = rd.buf;
            let source = cached(&mut ids.source, rd.raw_str()?)?;
            let destination =
                if rd.is_nil() { None } else { Some(cached(&mut ids.destination, rd.raw_str()?)?) };
            let kind = rd.kind(&mut ids.names)?;
            let headers = Headers::from(rd.str_map()?);
            let priority = rd.small()?;
            let ttl = rd.small()?;
            let used = &start[..start.len() - rd.buf.len()];
            if headers.is_empty() && !matches!(kind, MessageType::Control(_)) {
                Middle::keep(&mut ids.middle, used, &source, &destination, &kind, priority, ttl);
            }
            (source, destination, kind, headers, priority, ttl)
        }
    };
    let timestamp_ms = rd.uint()?;
    let sequence = rd.uint()?;
    let len = rd.bin_len()? as usize;
    if rd.buf.len() != len {
        return None; // short, or trailing bytes
    }
    let payload = payload(rd.buf);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Heads whose middle fields the encoder copied from its cache (per test thread).
        pub(super) static ENCODER_HITS: Cell<usize> = const { Cell::new(0) };
    }

    /// A link interleaving a few topics and methods shares each one's allocation; past
    /// [`NAMES`] distinct ones the oldest is forgotten (and allocated again when it returns).
    #[test]
    fn interleaved_topics_share_their_names_up_to_the_cache_size() {
        let frame = |i: usize| {
            let kind = match i % 2 {
                // Longer than the 23 bytes a name holds inline, so they live in allocations.
                0 => MessageType::Event { topic: format!("robot.interleaved.topic.{i}").into() },
                _ => MessageType::Request { method: format!("robot.interleaved.topic.{i}").into() },
            };
            let mut buf = BytesMut::new();
            encode(&Message::new("ab", kind), &mut buf).unwrap();
            buf.freeze()
        };
        let name = |m: &Message| m.topic().or(m.method()).unwrap().as_ptr();
        let mut ids = IdCache::default();
        let first: Vec<_> = (0..NAMES).map(|i| decode_cached(&frame(i), &mut ids).unwrap()).collect();
        for round in 0..3 {
            for (i, seen) in first.iter().enumerate() {
                let m = decode_cached(&frame(i), &mut ids).unwrap();
                assert_eq!(name(&m), name(seen), "round {round}: name {i} was not shared");
            }
        }
        // One more distinct name evicts the oldest: it decodes fine, into a fresh allocation.
        let extra = decode_cached(&frame(NAMES), &mut ids).unwrap();
        assert_eq!(
            extra.topic().or(extra.method()),
            Some(format!("robot.interleaved.topic.{NAMES}").as_str())
        );
        let back = decode_cached(&frame(0), &mut ids).unwrap();
        assert_eq!(back.kind, first[0].kind);
        assert_ne!(name(&back), name(&first[0]), "the oldest name was evicted");
        let kept = decode_cached(&frame(NAMES - 1), &mut ids).unwrap();
        assert_eq!(name(&kept), name(&first[NAMES - 1]), "a recent name stays shared");
    }

    /// A message whose middle fields (source .. hop limit) are the last one's is encoded by
    /// copying their bytes and decoded by comparing them; one that differs anywhere in them
    /// (each field in turn, a header, a control message, a middle too long to keep) is encoded
    /// and decoded field by field. Either way the bytes are the stateless encoder's and the
    /// decoded message is exactly what was sent.
    #[test]
    fn repeated_middle_fields_come_from_the_last_envelope_both_ways_and_changes_do_not() {
        let base = Message::new("robot-7", MessageType::Event { topic: "odom.pose".into() })
            .with_destination("hub")
            .with_payload_bytes(Bytes::from_static(b"x"));
        let with = |f: &dyn Fn(&mut Message)| {
            let mut m = base.clone();
            f(&mut m);
            m
        };
        let long = "t".repeat(MIDDLE_MAX);
        // (message, whether its middle is the previous message's)
        let run: Vec<(Message, bool)> = vec![
            (base.clone(), false),
            (with(&|m| m.id += 1), true),
            (with(&|m| m.correlation_id = Some(9)), true),
            (with(&|m| m.timestamp_ms = 77), true),
            (with(&|m| m.source = "robot-8".into()), false),
            (base.clone(), false),
            (with(&|m| m.destination = Some("huc".into())), false),
            (with(&|m| m.destination = None), false),
            (with(&|m| m.kind = MessageType::Event { topic: "odom.posf".into() }), false),
            (with(&|m| m.kind = MessageType::Broadcast { topic: "odom.pose".into() }), false),
            (with(&|m| m.kind = MessageType::Request { method: "odom.pose".into() }), false),
            (base.clone(), false),
            (with(&|m| m.priority = 129), false),
            (with(&|m| m.ttl = 9), false),
            (base.clone(), false),
            (
                with(&|m| {
                    m.headers.insert("k".into(), "v".into());
                }),
                false,
            ),
            // A message with headers is not kept: the one before it still is.
            (base.clone(), true),
            (
                with(&|m| m.kind = MessageType::Control(ControlOperation::Goodbye { reason: "x".into() })),
                false,
            ),
            (base.clone(), true),
            (with(&|m| m.kind = MessageType::Event { topic: long.as_str().into() }), false),
            (with(&|m| m.kind = MessageType::Event { topic: long.as_str().into() }), false),
            (base.clone(), false),
            (base.clone(), true),
        ];
        let (mut ids, mut sent) = (IdCache::default(), None);
        for (i, (m, hit)) in run.iter().enumerate() {
            let mut buf = BytesMut::new();
            encode(m, &mut buf).unwrap();
            // The encoder with the cache writes the same bytes, taking the same ones from it.
            let mut cached = BytesMut::new();
            let hits = ENCODER_HITS.with(Cell::get);
            encode_head(m, &mut cached, true, Some(&mut sent)).unwrap();
            assert_eq!(cached, buf, "message {i}: encoded");
            assert_eq!(
                ENCODER_HITS.with(Cell::get) - hits,
                usize::from(*hit),
                "message {i}: encoder hit: {hit}"
            );
            let hits = ids.middle_hits;
            assert_eq!(decode_cached(&buf.freeze(), &mut ids).as_ref(), Some(m), "message {i}");
            assert_eq!(ids.middle_hits - hits, usize::from(*hit), "message {i}: decoder hit: {hit}");
        }
    }

    /// A middle of exactly [`MIDDLE_MAX`] bytes is kept (its repeat is a hit both ways); one
    /// byte longer is not (its repeat is encoded and decoded field by field).
    #[test]
    fn a_middle_of_the_kept_size_is_kept_and_one_byte_more_is_not() {
        let msg = |topic_len: usize| {
            Message::new("robot-7", MessageType::Event { topic: "t".repeat(topic_len).into() })
                .with_destination("hub")
        };
        let kept_len = |m: &Message| {
            let mut sent = None;
            encode_head(m, &mut BytesMut::new(), true, Some(&mut sent)).unwrap();
            sent.map(|k| k.len)
        };
        let at = (1..MIDDLE_MAX)
            .find(|&t| kept_len(&msg(t)) == Some(MIDDLE_MAX))
            .expect("a topic length that makes the middle exactly MIDDLE_MAX bytes");
        assert_eq!(kept_len(&msg(at + 1)), None, "a middle of MIDDLE_MAX + 1 bytes is not kept");
        for (m, kept) in [(msg(at), true), (msg(at + 1), false)] {
            let (mut sent, mut ids) = (None, IdCache::default());
            let mut buf = BytesMut::new();
            encode_head(&m, &mut buf, true, Some(&mut sent)).unwrap();
            let hits = ENCODER_HITS.with(Cell::get);
            let mut again = BytesMut::new();
            encode_head(&m, &mut again, true, Some(&mut sent)).unwrap();
            assert_eq!(again, buf);
            assert_eq!(ENCODER_HITS.with(Cell::get) - hits, usize::from(kept), "encoder, kept: {kept}");
            let frame = buf.freeze();
            assert_eq!(decode_cached(&frame, &mut ids).as_ref(), Some(&m));
            assert_eq!(decode_cached(&frame, &mut ids).as_ref(), Some(&m));
            assert_eq!(ids.middle_hits, usize::from(kept), "decoder, kept: {kept}");
        }
    }

    /// Heads on both sides of the stack scratch's size: the scratch path and the fallback
    /// straight into the buffer give the same bytes as rmp-serde, after anything already in
    /// the buffer, and the payload is appended (or left out) either way.
    #[test]
    fn heads_at_and_past_the_scratch_size_encode_alike() {
        let mut seen = [false; 2];
        for topic_len in 150..SCRATCH + 8 {
            let m = Message::new("src", MessageType::Event { topic: "t".repeat(topic_len).into() })
                .with_destination("dst")
                .with_payload_bytes(Bytes::from_static(b"payload"));
            seen[usize::from(head(&mut Scratch::new(), &m, None).is_ok())] = true;
            let mut reference = BytesMut::new();
            crate::encode_envelope_serde(&m, &mut reference).unwrap();
            let mut fast = BytesMut::from(&b"prefix"[..]);
            encode(&m, &mut fast).unwrap();
            assert_eq!(&fast[6..], &reference[..], "topic of {topic_len} bytes");
            let mut headless = BytesMut::new();
            encode_head(&m, &mut headless, false, None).unwrap();
            assert_eq!(&headless[..], &reference[..reference.len() - 7], "topic of {topic_len} bytes");
        }
        assert_eq!(seen, [true, true], "both the scratch and the fallback were taken");
    }

    /// Agent ids and variant names are compared as bytes before (or instead of) validating
    /// UTF-8: a cached id never lets different, invalid bytes through, and a variant name that
    /// is not valid UTF-8 is refused.
    #[test]
    fn ids_and_names_compared_as_bytes_still_refuse_invalid_utf8() {
        let mut ids = IdCache::default();
        let m = Message::new("ab", MessageType::Event { topic: "tp.x".into() }).with_destination("cd");
        let mut buf = BytesMut::new();
        encode(&m, &mut buf).unwrap();
        let good = buf.freeze();
        assert_eq!(decode_cached(&good, &mut ids), Some(m.clone()), "primes the cache");
        let again = decode_cached(&good, &mut ids).expect("a cache hit");
        assert_eq!(Some(&again.source), ids.source.as_ref(), "the cached id is handed out");
        assert_eq!(again.topic(), ids.names.slots[0].as_deref(), "the cached topic is handed out");
        for (at, what) in [
            (b"ab".as_slice(), "source"),
            (b"cd".as_slice(), "destination"),
            (b"Event".as_slice(), "variant"),
            (b"tp.x".as_slice(), "topic"),
        ] {
            let mut bad = good.to_vec();
            let i = bad.windows(at.len()).position(|w| w == at).unwrap();
            bad[i] = 0xff;
            assert_eq!(decode_cached(&Bytes::from(bad), &mut ids), None, "an invalid {what} was accepted");
        }
    }

    /// The fast decoder itself (not the rmp-serde fallback) reads what the fast encoder writes,
    /// in every length class.
    #[test]
    fn fast_decoder_takes_every_length_class_without_falling_back() {
        for len in [0usize, 31, 32, 255, 256, 65_535, 65_536] {
            for entries in [0usize, 15, 16] {
                let mut m = Message::new(
                    "s".repeat(len.min(300)),
                    MessageType::Request { method: "m".repeat(len).into() },
                )
                .with_payload_bytes(Bytes::from(vec![1u8; len]));
                m.headers = (0..entries).map(|i| (format!("k{i}"), "v".repeat(len.min(1000)))).collect();
                m.destination = Some(AgentId::new("d"));
                m.correlation_id = Some(len as u64 * 4_294_967_311);
                m.id = len as u64 * 65_537;
                let mut buf = BytesMut::new();
                encode(&m, &mut buf).unwrap();
                let back = decode(&buf.freeze()).unwrap_or_else(|| panic!("fast path refused length {len}"));
                assert_eq!(back, m);
            }
        }
    }
}

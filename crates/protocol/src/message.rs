//! The message model: [`Message`], [`MessageType`], [`ControlOperation`] and their ids.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use smol_str::SmolStr;

use crate::version::ProtocolVersion;

/// A message id, unique among the messages created by one process.
///
/// A response carries the id of its request as its correlation id.
pub type MessageId = u64;

/// Header map of a message: ordered, so that encoding is deterministic.
///
/// Used as the [`BTreeMap`] it dereferences to (`get`, `insert`, `iter`, `len` …). Most
/// messages carry no headers: an empty map is held as nothing at all (8 bytes, no allocation,
/// nothing to do when the message is dropped), and the map is allocated by the first mutable
/// use. Empty and never-used maps compare equal.
#[derive(Clone, Default)]
// The box is the point: 8 bytes in every message instead of the map's 24, and no map to drop.
#[allow(clippy::box_collection)]
pub struct Headers(Option<Box<BTreeMap<String, String>>>);

/// What an empty [`Headers`] dereferences to.
static NO_HEADERS: BTreeMap<String, String> = BTreeMap::new();

impl Headers {
    /// An empty map (no allocation).
    pub const fn new() -> Self {
        Headers(None)
    }

    /// The map, allocated if this is its first use.
    pub fn map_mut(&mut self) -> &mut BTreeMap<String, String> {
        self.0.get_or_insert_default()
    }

    /// Takes the map out, leaving this one empty.
    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0.map(|b| *b).unwrap_or_default()
    }
}

impl Deref for Headers {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        self.0.as_deref().unwrap_or(&NO_HEADERS)
    }
}

impl std::ops::DerefMut for Headers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.map_mut()
    }
}

impl PartialEq for Headers {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Headers {}

impl fmt::Debug for Headers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        (**self).fmt(f)
    }
}

impl From<BTreeMap<String, String>> for Headers {
    fn from(m: BTreeMap<String, String>) -> Self {
        Headers((!m.is_empty()).then(|| Box::new(m)))
    }
}

impl From<Headers> for BTreeMap<String, String> {
    fn from(h: Headers) -> Self {
        h.into_map()
    }
}

impl FromIterator<(String, String)> for Headers {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        BTreeMap::from_iter(iter).into()
    }
}

impl Extend<(String, String)> for Headers {
    fn extend<I: IntoIterator<Item = (String, String)>>(&mut self, iter: I) {
        let mut iter = iter.into_iter().peekable();
        if iter.peek().is_some() {
            self.map_mut().extend(iter);
        }
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a String, &'a String);
    type IntoIter = std::collections::btree_map::Iter<'a, String, String>;

    fn into_iter(self) -> Self::IntoIter {
        (**self).iter()
    }
}

impl IntoIterator for Headers {
    type Item = (String, String);
    type IntoIter = std::collections::btree_map::IntoIter<String, String>;

    fn into_iter(self) -> Self::IntoIter {
        self.into_map().into_iter()
    }
}

impl Serialize for Headers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (**self).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Headers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(d).map(Headers::from)
    }
}

/// Free-form key/value metadata carried by `Hello` and `HelloAck`.
pub type Metadata = BTreeMap<String, String>;

/// Default hop limit of a new message: a hub relaying it decrements it and drops it at zero.
pub const DEFAULT_TTL: u8 = 8;

/// Default priority of a new message (0 lowest, 255 highest).
pub const DEFAULT_PRIORITY: u8 = 128;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Returns a fresh message id (process-wide counter; never 0).
pub fn next_message_id() -> MessageId {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Defines an immutable string type that is cheap to clone: up to 23 bytes are held inline
/// (a clone is a copy: no allocation, and no reference count that the threads a message passes
/// through would bounce between their caches), longer ones in one shared, reference-counted
/// allocation. Compared, hashed and ordered by value, (de)serialized as a plain string.
macro_rules! shared_str {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialOrd, Ord, Default)]
        pub struct $name(SmolStr);

        impl std::hash::Hash for $name {
            fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
                // Consistent with `eq` (equal values have equal strings) and with `Borrow<str>`.
                (*self.0).hash(state)
            }
        }

        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.0 == other.0
            }
        }

        impl Eq for $name {}

        impl $name {
            /// Creates one from any string.
            pub fn new(s: impl AsRef<str>) -> Self {
                $name(SmolStr::new(s))
            }

            /// True when the string is held in a shared allocation (longer than 23 bytes), not
            /// inline.
            pub fn is_shared(&self) -> bool {
                self.0.is_heap_allocated()
            }

            /// The string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl std::borrow::Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name::new(s)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(SmolStr::from(s))
            }
        }

        impl From<&String> for $name {
            fn from(s: &String) -> Self {
                $name::new(s)
            }
        }

        impl From<&$name> for $name {
            fn from(s: &$name) -> Self {
                s.clone()
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s: std::borrow::Cow<'de, str> = Deserialize::deserialize(d)?;
                Ok($name::new(s))
            }
        }
    };
}

shared_str! {
    /// The name of an agent: cheap to clone (up to 23 bytes inline, longer ones shared),
    /// compared by value.
    AgentId
}

shared_str! {
    /// A topic or a method name: cheap to clone (up to 23 bytes inline, longer ones shared),
    /// compared by value.
    ///
    /// A link's decoder hands out its cached `Name` for a topic that repeats, so a stream of
    /// events on one topic allocates nothing for it per message.
    Name
}

/// Status of a response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseStatus {
    /// The request succeeded; the payload is the result.
    Ok,
    /// The request failed.
    Error {
        /// Application- or engine-defined error code (see [`error_codes`]).
        code: u32,
        /// Human-readable description.
        message: String,
    },
}

/// Error codes the engine itself uses in error responses; applications use codes >= 1000.
pub mod error_codes {
    /// The destination agent is not connected to the node that tried to route the request.
    pub const UNROUTABLE: u32 = 404;
    /// The message's hop limit reached zero before it arrived.
    pub const TTL_EXPIRED: u32 = 508;
    /// The receiver does not handle this method.
    pub const UNKNOWN_METHOD: u32 = 501;
    /// The receiver failed while handling the request.
    pub const INTERNAL: u32 = 500;
}

/// Why a handshake was refused; carried by [`ControlOperation::Reject`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The two sides speak different major protocol versions.
    VersionMismatch {
        /// The version of the side that rejected.
        ours: ProtocolVersion,
        /// The version the peer offered.
        theirs: ProtocolVersion,
    },
    /// Another connected agent already uses this agent id.
    DuplicateAgentId(AgentId),
    /// The authenticator refused the peer.
    Unauthorized(String),
    /// The first message was not a `Hello`, or the handshake was otherwise malformed.
    Malformed(String),
    /// The node accepts no more peers.
    Overloaded,
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::VersionMismatch { ours, theirs } => {
                write!(f, "protocol version mismatch: ours {ours}, theirs {theirs}")
            }
            RejectReason::DuplicateAgentId(id) => write!(f, "agent id {id:?} is already connected"),
            RejectReason::Unauthorized(why) => write!(f, "unauthorized: {why}"),
            RejectReason::Malformed(why) => write!(f, "malformed handshake: {why}"),
            RejectReason::Overloaded => f.write_str("node accepts no more peers"),
        }
    }
}

/// Protocol management operations, carried by [`MessageType::Control`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlOperation {
    /// First message of the dialing side: who it is and what it speaks.
    Hello {
        /// The protocol version the sender speaks.
        version: ProtocolVersion,
        /// Capabilities the sender offers (see [`capabilities`](crate::capabilities)).
        capabilities: Vec<String>,
        /// Free-form metadata, seen by the listener's authenticator (e.g. a token).
        metadata: Metadata,
    },
    /// The listener's acceptance: the negotiated version and capabilities.
    HelloAck {
        /// The negotiated version (same major, lower minor).
        version: ProtocolVersion,
        /// The intersection of both sides' capabilities.
        capabilities: Vec<String>,
        /// Free-form metadata of the listener.
        metadata: Metadata,
    },
    /// The listener's refusal; the link is closed after it.
    Reject {
        /// Why.
        reason: RejectReason,
    },
    /// Orderly close: the sender closes the link after this message.
    Goodbye {
        /// Why the sender is leaving.
        reason: String,
    },
    /// The sender wants events whose topic matches `pattern`.
    Subscribe {
        /// A topic pattern (see [`topic`](crate::topic)).
        pattern: String,
    },
    /// The sender no longer wants events matching `pattern`.
    Unsubscribe {
        /// The pattern given to an earlier `Subscribe`.
        pattern: String,
    },
}

/// What a message is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MessageType {
    /// A call that expects a [`MessageType::Response`] with this message's id as correlation id.
    Request {
        /// The method called.
        method: Name,
    },
    /// The answer to a request.
    Response {
        /// Success or failure.
        status: ResponseStatus,
    },
    /// A notification on a topic, delivered to subscribers whose pattern matches.
    Event {
        /// The topic, `.`-separated segments.
        topic: Name,
    },
    /// A message for every connected agent.
    Broadcast {
        /// The topic, `.`-separated segments.
        topic: Name,
    },
    /// Liveness probe; a heartbeat with a correlation id answers the heartbeat with that id.
    Heartbeat,
    /// Protocol management.
    Control(ControlOperation),
}

impl MessageType {
    /// A short name of the type, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            MessageType::Request { .. } => "request",
            MessageType::Response { .. } => "response",
            MessageType::Event { .. } => "event",
            MessageType::Broadcast { .. } => "broadcast",
            MessageType::Heartbeat => "heartbeat",
            MessageType::Control(_) => "control",
        }
    }
}

/// Error encoding or decoding a typed payload.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    /// The value could not be encoded as MessagePack.
    #[error("payload encode failed: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    /// The payload bytes are not a MessagePack encoding of the requested type.
    #[error("payload decode failed: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
}

/// Encodes any `Serialize` value as a MessagePack payload (structs as maps, so that other
/// languages see field names).
pub fn encode_payload<T: Serialize + ?Sized>(value: &T) -> Result<Bytes, PayloadError> {
    let mut buf = Vec::with_capacity(64);
    value.serialize(&mut rmp_serde::Serializer::new(&mut buf).with_struct_map())?;
    Ok(Bytes::from(buf))
}

/// Decodes a MessagePack payload into any `DeserializeOwned` type.
pub fn decode_payload<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PayloadError> {
    Ok(rmp_serde::from_slice(bytes)?)
}

/// One message: the unit every backend carries.
///
/// The payload is opaque bytes (MessagePack when built with the typed constructors), reachable
/// without a copy through [`Message::payload`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique id (per creating process).
    pub id: MessageId,
    /// For a response: the id of the request it answers. For a heartbeat reply: the probe's id.
    pub correlation_id: Option<MessageId>,
    /// The agent that created the message.
    pub source: AgentId,
    /// The agent it is addressed to; `None` for a published event or broadcast.
    pub destination: Option<AgentId>,
    /// What the message is.
    pub kind: MessageType,
    /// Application headers.
    pub headers: Headers,
    /// 0 lowest .. 255 highest; queues deliver higher priorities first, FIFO within one.
    pub priority: u8,
    /// Hop limit: every relay decrements it; a message reaching 0 is dropped.
    pub ttl: u8,
    /// Milliseconds since the Unix epoch when the message was first sent (set by the engine).
    pub timestamp_ms: u64,
    /// Per-link sequence number, reserved for loss-free reconnection (0 = unset).
    pub sequence: u64,
    /// The payload bytes.
    pub payload: Bytes,
}

impl Message {
    /// A message of any type with an empty payload.
    pub fn new(source: impl Into<AgentId>, kind: MessageType) -> Self {
        Message {
            id: next_message_id(),
            correlation_id: None,
            source: source.into(),
            destination: None,
            kind,
            headers: Headers::new(),
            priority: DEFAULT_PRIORITY,
            ttl: DEFAULT_TTL,
            timestamp_ms: 0,
            sequence: 0,
            payload: Bytes::new(),
        }
    }

    /// A request calling `method` with `payload` (MessagePack-encoded).
    pub fn request<T: Serialize + ?Sized>(
        source: impl Into<AgentId>,
        method: impl Into<Name>,
        payload: &T,
    ) -> Result<Self, PayloadError> {
        Ok(Message::new(source, MessageType::Request { method: method.into() })
            .with_payload_bytes(encode_payload(payload)?))
    }

    /// A successful response to `request`, addressed to its source.
    pub fn response<T: Serialize + ?Sized>(
        source: impl Into<AgentId>,
        request: &Message,
        payload: &T,
    ) -> Result<Self, PayloadError> {
        Ok(Message::response_bytes(source, request, encode_payload(payload)?))
    }

    /// A successful response to `request` carrying raw payload bytes.
    pub fn response_bytes(source: impl Into<AgentId>, request: &Message, payload: Bytes) -> Self {
        let mut m = Message::new(source, MessageType::Response { status: ResponseStatus::Ok })
            .with_payload_bytes(payload);
        m.correlation_id = Some(request.id);
        m.destination = Some(request.source.clone());
        m.priority = request.priority;
        m
    }

    /// A failed response to `request` with an error code and description.
    pub fn error_response(
        source: impl Into<AgentId>,
        request: &Message,
        code: u32,
        message: impl Into<String>,
    ) -> Self {
        let mut m = Message::new(
            source,
            MessageType::Response { status: ResponseStatus::Error { code, message: message.into() } },
        );
        m.correlation_id = Some(request.id);
        m.destination = Some(request.source.clone());
        m.priority = request.priority;
        m
    }

    /// An event on `topic` with `payload` (MessagePack-encoded).
    pub fn event<T: Serialize + ?Sized>(
        source: impl Into<AgentId>,
        topic: impl Into<Name>,
        payload: &T,
    ) -> Result<Self, PayloadError> {
        Ok(Message::new(source, MessageType::Event { topic: topic.into() })
            .with_payload_bytes(encode_payload(payload)?))
    }

    /// A broadcast on `topic` with `payload` (MessagePack-encoded).
    pub fn broadcast<T: Serialize + ?Sized>(
        source: impl Into<AgentId>,
        topic: impl Into<Name>,
        payload: &T,
    ) -> Result<Self, PayloadError> {
        Ok(Message::new(source, MessageType::Broadcast { topic: topic.into() })
            .with_payload_bytes(encode_payload(payload)?))
    }

    /// A heartbeat probe.
    pub fn heartbeat(source: impl Into<AgentId>) -> Self {
        let mut m = Message::new(source, MessageType::Heartbeat);
        m.priority = u8::MAX;
        m
    }

    /// The answer to heartbeat `probe`.
    pub fn heartbeat_reply(source: impl Into<AgentId>, probe: &Message) -> Self {
        let mut m = Message::heartbeat(source);
        m.correlation_id = Some(probe.id);
        m
    }

    /// A control message.
    pub fn control(source: impl Into<AgentId>, op: ControlOperation) -> Self {
        let mut m = Message::new(source, MessageType::Control(op));
        m.priority = u8::MAX;
        m
    }

    /// Adds a header.
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Sets the priority (0 lowest, 255 highest).
    pub fn with_priority(mut self, priority: u8) -> Self {
        self.priority = priority;
        self
    }

    /// Sets the hop limit.
    pub fn with_ttl(mut self, ttl: u8) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the destination agent.
    pub fn with_destination(mut self, to: impl Into<AgentId>) -> Self {
        self.destination = Some(to.into());
        self
    }

    /// Replaces the payload with raw bytes (no copy, no encoding).
    pub fn with_payload_bytes(mut self, payload: Bytes) -> Self {
        self.payload = payload;
        self
    }

    /// The raw payload, without a copy.
    pub fn payload(&self) -> &Bytes {
        &self.payload
    }

    /// Decodes the MessagePack payload into `T` (a `serde_json::Value` works too).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, PayloadError> {
        decode_payload(&self.payload)
    }

    /// True for a request.
    pub fn is_request(&self) -> bool {
        matches!(self.kind, MessageType::Request { .. })
    }

    /// True for a response.
    pub fn is_response(&self) -> bool {
        matches!(self.kind, MessageType::Response { .. })
    }

    /// The topic of an event or broadcast.
    pub fn topic(&self) -> Option<&str> {
        match &self.kind {
            MessageType::Event { topic } | MessageType::Broadcast { topic } => Some(topic),
            _ => None,
        }
    }

    /// The method of a request.
    pub fn method(&self) -> Option<&str> {
        match &self.kind {
            MessageType::Request { method } => Some(method),
            _ => None,
        }
    }

    /// Bytes of the message other than its payload, as an upper-bound estimate used for limits
    /// on backends that carry values (the codec measures the real encoding).
    pub fn envelope_len_estimate(&self) -> usize {
        let kind = match &self.kind {
            MessageType::Request { method } => method.len(),
            MessageType::Event { topic } | MessageType::Broadcast { topic } => topic.len(),
            MessageType::Response { status: ResponseStatus::Error { message, .. } } => message.len() + 5,
            _ => 0,
        };
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
        64 + self.source.len() + self.destination.as_ref().map_or(0, |d| d.len()) + kind + headers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_hold_nothing_until_written_and_read_as_a_map() {
        let mut h = Headers::new();
        assert!(h.0.is_none() && h.is_empty() && h.get("k").is_none());
        // An empty map handed in (a decoded envelope without headers) is held as nothing too.
        assert!(Headers::from(BTreeMap::new()).0.is_none());
        assert_eq!(h, Headers::from(BTreeMap::new()));
        h.insert("b".into(), "2".into());
        h.insert("a".into(), "1".into());
        assert!(h.0.is_some());
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_ne!(h, Headers::new());
        let same: Headers =
            [("a".to_string(), "1".to_string()), ("b".into(), "2".into())].into_iter().collect();
        assert_eq!(h, same);
        // Cleared through the map, it equals one never written.
        let mut cleared = h.clone();
        cleared.clear();
        assert_eq!(cleared, Headers::new());
        let mut none = Headers::new();
        none.extend(std::iter::empty());
        assert!(none.0.is_none(), "extending by nothing allocates nothing");
        assert_eq!(h.clone().into_map().len(), 2);
        assert_eq!(format!("{h:?}"), r#"{"a": "1", "b": "2"}"#);
    }

    #[test]
    fn headers_serialize_exactly_as_the_map() {
        let map: BTreeMap<String, String> = [("trace".to_string(), "t-1".to_string())].into();
        let as_map = rmp_serde::to_vec(&map).unwrap();
        let h = Headers::from(map.clone());
        assert_eq!(rmp_serde::to_vec(&h).unwrap(), as_map);
        assert_eq!(rmp_serde::from_slice::<Headers>(&as_map).unwrap(), h);
        let empty = rmp_serde::to_vec(&BTreeMap::<String, String>::new()).unwrap();
        assert_eq!(rmp_serde::to_vec(&Headers::new()).unwrap(), empty);
        assert!(rmp_serde::from_slice::<Headers>(&empty).unwrap().0.is_none());
    }

    #[test]
    fn typed_payload_round_trips_json_value() {
        let v = serde_json::json!({"n": 42, "name": "fib", "list": [1, 2, 3]});
        let m = Message::request("a", "compute", &v).unwrap();
        let back: serde_json::Value = m.payload_as().unwrap();
        assert_eq!(back, v);
        assert_eq!(m.method(), Some("compute"));
    }

    #[test]
    fn response_correlates_and_addresses_source() {
        let req = Message::request("a", "m", &1u32).unwrap().with_priority(7);
        let resp = Message::response("b", &req, &2u32).unwrap();
        assert_eq!(resp.correlation_id, Some(req.id));
        assert_eq!(resp.destination.as_deref(), Some("a"));
        assert_eq!(resp.priority, 7);
        let err = Message::error_response("b", &req, 1001, "nope");
        assert!(matches!(
            err.kind,
            MessageType::Response { status: ResponseStatus::Error { code: 1001, .. } }
        ));
    }

    #[test]
    fn ids_are_unique_and_nonzero() {
        let a = Message::heartbeat("x");
        let b = Message::heartbeat("x");
        assert_ne!(a.id, b.id);
        assert!(a.id > 0 && b.id > 0);
    }

    /// A `Name` behaves as its string (equality, hashing, ordering, MessagePack); a clone of
    /// an event copies a short topic and shares a long one, allocating nothing either way.
    #[test]
    fn names_compare_hash_and_serialize_as_their_strings() {
        use std::collections::HashSet;
        let a = Name::new("robot.odom");
        assert_eq!(a, "robot.odom");
        assert_eq!(a, Name::from(String::from("robot.odom")));
        assert!(Name::new("a.b") < Name::new("a.c"));
        let set: HashSet<Name> = [Name::new("x"), Name::new("x"), Name::new("y")].into_iter().collect();
        assert_eq!(set.len(), 2);
        assert!(set.contains("x"), "looked up by &str through Borrow");
        let packed = rmp_serde::to_vec(&a).unwrap();
        assert_eq!(packed, rmp_serde::to_vec("robot.odom").unwrap(), "encoded as a plain string");
        assert_eq!(rmp_serde::from_slice::<Name>(&packed).unwrap(), a);
        let shared = |m: &Message| match &m.kind {
            MessageType::Event { topic } => topic.is_shared(),
            _ => unreachable!(),
        };
        // Up to 23 bytes a name is held inline: a clone is a copy, nothing is allocated.
        let m = Message::event("src", "robot.odom", &1u8).unwrap();
        assert!(!shared(&m));
        assert_eq!(m.clone().topic(), Some("robot.odom"));
        // Longer, a clone shares the one allocation.
        let long = "robot.arm.joint7.temperature";
        let m = Message::event("src", long, &1u8).unwrap();
        let copy = m.clone();
        assert!(shared(&m));
        assert_eq!(m.topic().unwrap().as_ptr(), copy.topic().unwrap().as_ptr(), "the topic is shared");
        assert_eq!(copy.topic(), Some(long));
    }

    #[test]
    fn payload_is_shared_not_copied() {
        let bytes = Bytes::from(vec![1u8; 1024]);
        let m = Message::new("a", MessageType::Heartbeat).with_payload_bytes(bytes.clone());
        assert_eq!(m.payload().as_ptr(), bytes.as_ptr());
    }

    #[test]
    fn wrong_payload_type_is_a_typed_error() {
        let m = Message::event("a", "t", &"text").unwrap();
        let r: Result<u64, _> = m.payload_as();
        assert!(matches!(r, Err(PayloadError::Decode(_))));
    }
}

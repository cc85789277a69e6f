//! A hand-written envelope encoder producing exactly the bytes rmp-serde produces for a
//! `Message` (checked by a property test and the golden frames), without serde's generic
//! machinery on the hot path.

use bytes::{BufMut, BytesMut};
use hivewire_protocol::{
    ControlOperation, Message, MessageType, ProtocolVersion, RejectReason, ResponseStatus,
};
use rmp::encode::{
    write_array_len, write_bin, write_map_len, write_nil, write_str, write_uint, ValueWriteError,
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
    dst.reserve(96 + msg.payload.len());
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
    write_bin(w, &msg.payload)?;
    Ok(())
}

//! Protocol versions and the negotiation rule.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A protocol version: `major.minor`.
///
/// Rule: two sides can talk when their majors are equal; they then speak the lower of the two
/// minors. Different majors are refused with [`RejectReason::VersionMismatch`](crate::RejectReason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProtocolVersion {
    /// Incompatible changes bump the major.
    pub major: u16,
    /// Compatible additions bump the minor.
    pub minor: u16,
}

impl ProtocolVersion {
    /// The version this build speaks.
    pub const CURRENT: ProtocolVersion = ProtocolVersion { major: 1, minor: 0 };

    /// Creates a version.
    pub const fn new(major: u16, minor: u16) -> Self {
        ProtocolVersion { major, minor }
    }

    /// The version two sides speak, or `None` when their majors differ.
    pub fn negotiate(self, other: ProtocolVersion) -> Option<ProtocolVersion> {
        (self.major == other.major)
            .then(|| ProtocolVersion { major: self.major, minor: self.minor.min(other.minor) })
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

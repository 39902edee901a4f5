//! Stable error codes for everything that crosses the wire. The numbers never change meaning;
//! new codes get new numbers, and a peer that sees a number it does not know keeps it as
//! [`ErrorCode::Other`] instead of failing.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

macro_rules! codes {
    ($($(#[$doc:meta])* $name:ident = $num:literal, $text:literal;)*) => {
        /// A stable, numbered reason that crosses the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this version does not know.
            Other(u16),
        }

        impl ErrorCode {
            /// Every named code, for documentation and tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The stable number.
            pub fn number(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $num,)*
                    ErrorCode::Other(n) => n,
                }
            }

            /// The stable snake_case name.
            pub fn name(self) -> &'static str {
                match self {
                    $(ErrorCode::$name => $text,)*
                    ErrorCode::Other(_) => "other",
                }
            }

            /// The code for a number.
            pub fn from_number(n: u16) -> Self {
                match n {
                    $($num => ErrorCode::$name,)*
                    n => ErrorCode::Other(n),
                }
            }
        }
    };
}

codes! {
    /// The bytes are not a valid frame.
    Malformed = 1, "malformed";
    /// A frame is over the size limit.
    FrameTooLarge = 2, "frame_too_large";
    /// The peer speaks a protocol version this side does not.
    UnsupportedVersion = 3, "unsupported_version";
    /// A frame arrived in a state where it is not allowed.
    UnexpectedFrame = 4, "unexpected_frame";
    /// The agent's key is not registered and no valid enrolment token was presented.
    UnknownAgent = 10, "unknown_agent";
    /// The agent's key was revoked.
    RevokedAgent = 11, "revoked_agent";
    /// The enrolment token is wrong.
    InvalidEnrollToken = 12, "invalid_enroll_token";
    /// The enrolment token is past its expiry.
    EnrollTokenExpired = 16, "enroll_token_expired";
    /// The enrolment token has enrolled as many agents as it may.
    EnrollTokenUsedUp = 17, "enroll_token_used_up";
    /// The enrolment token was revoked.
    EnrollTokenRevoked = 18, "enroll_token_revoked";
    /// The handshake proof does not verify for this connection.
    BadProof = 13, "bad_proof";
    /// A batch signature does not verify.
    BadSignature = 14, "bad_signature";
    /// A batch names another agent than the one authenticated on the connection.
    AgentMismatch = 15, "agent_mismatch";
    /// A delta names a meter the catalog does not have.
    UnknownMeter = 20, "unknown_meter";
    /// A delta is inconsistent (negative quantity, bad timestamps, zero count, …).
    InvalidDelta = 21, "invalid_delta";
    /// A quantity overflowed while being added up.
    Overflow = 22, "overflow";
    /// An event time is outside the accepted window.
    EventTimeOutOfRange = 23, "event_time_out_of_range";
    /// The agent has as many epochs as the collector keeps per agent; a new one is refused.
    TooManyEpochs = 24, "too_many_epochs";
    /// The batch would open one gap too many above the epoch's watermark
    /// (`tally_collector::core::dedup::MAX_GAPS`); nothing of it was written. The agent resends
    /// it after the batches below it are acknowledged.
    TooManyGaps = 25, "too_many_gaps";
    /// The collector failed internally; the agent should retry later.
    Internal = 30, "internal";
    /// The collector is overloaded; the agent should back off.
    Overloaded = 31, "overloaded";
    /// The collector is shutting down; the agent should reconnect elsewhere.
    ShuttingDown = 32, "shutting_down";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.number())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.number().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u16::deserialize(d).map(ErrorCode::from_number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_are_unique_and_round_trip() {
        let mut nums: Vec<u16> = ErrorCode::ALL.iter().map(|c| c.number()).collect();
        let mut names: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
        nums.sort();
        nums.dedup();
        names.sort();
        names.dedup();
        assert_eq!(nums.len(), ErrorCode::ALL.len());
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_number(c.number()), *c);
        }
        assert_eq!(ErrorCode::from_number(999), ErrorCode::Other(999));
    }
}

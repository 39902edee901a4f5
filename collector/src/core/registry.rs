//! Who may connect: the admission rule applied after a successful handshake, with no I/O.
//!
//! Owns [`admit`]. Guarantees: a revoked key is always refused, whatever token it presents; an
//! unknown key is registered only with the exact enrolment token (compared in constant time with
//! `subtle`; an empty token never matches); a
//! known key needs no token.

use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tally_protocol::batch::AgentId;
use tally_protocol::error::ErrorCode;

/// A registered agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Its ed25519 public key.
    pub public_key: [u8; 32],
    /// When it enrolled, ms.
    pub registered_at_ms: i64,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
    /// When it last completed a handshake, ms.
    pub last_seen_ms: i64,
}

/// What to do with an authenticated agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Known and not revoked.
    Known,
    /// Unknown, with the right enrolment token: register it.
    Enrol,
    /// Refuse with this code.
    Refuse(ErrorCode),
}

/// Decides on an agent from its record (if any) and the token it presented.
pub fn admit(
    existing: Option<&AgentRecord>,
    presented: Option<&[u8]>,
    enroll_token: &str,
) -> Admission {
    match (existing, presented) {
        (Some(rec), _) if rec.revoked_at_ms.is_some() => Admission::Refuse(ErrorCode::RevokedAgent),
        (Some(_), _) => Admission::Known,
        (None, None) => Admission::Refuse(ErrorCode::UnknownAgent),
        (None, Some(t)) if !t.is_empty() && bool::from(t.ct_eq(enroll_token.as_bytes())) => {
            Admission::Enrol
        }
        (None, Some(_)) => Admission::Refuse(ErrorCode::InvalidEnrollToken),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(revoked: bool) -> AgentRecord {
        AgentRecord {
            id: AgentId([1; 16]),
            public_key: [2; 32],
            registered_at_ms: 0,
            revoked_at_ms: revoked.then_some(5),
            last_seen_ms: 0,
        }
    }

    #[test]
    fn rules() {
        assert_eq!(
            admit(None, None, "t"),
            Admission::Refuse(ErrorCode::UnknownAgent)
        );
        assert_eq!(
            admit(None, Some(b"x"), "t"),
            Admission::Refuse(ErrorCode::InvalidEnrollToken)
        );
        assert_eq!(admit(None, Some(b"t"), "t"), Admission::Enrol);
        assert_eq!(admit(Some(&rec(false)), None, "t"), Admission::Known);
        assert_eq!(
            admit(Some(&rec(true)), Some(b"t"), "t"),
            Admission::Refuse(ErrorCode::RevokedAgent)
        );
        assert_eq!(
            admit(None, Some(b""), ""),
            Admission::Refuse(ErrorCode::InvalidEnrollToken)
        );
    }
}

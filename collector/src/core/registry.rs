//! Who may connect: the admission rule applied after a successful handshake, and the rules of
//! enrolment tokens, with no I/O.
//!
//! Owns [`admit`] and [`EnrollToken`]. Guarantees: a revoked key is always refused, whatever
//! token it presents; a known key needs no token; an unknown key is registered only with an
//! enrolment token that is known (by the SHA-256 of its secret, compared in constant time; only
//! the hash is ever stored), not revoked, not expired and not used up; an empty token never
//! matches.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use subtle::ConstantTimeEq;
use tally_protocol::batch::AgentId;
use tally_protocol::error::ErrorCode;

/// Most labels on a token (and so on the agents it enrols).
pub const MAX_TOKEN_LABELS: usize = 16;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 64;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Most enrolment tokens kept; spent ones (revoked, expired, used up) are dropped first.
pub const MAX_ENROLL_TOKENS: usize = 10_000;

/// An enrolment token as the collector keeps it: never the secret, only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollToken {
    /// Public id, `et_` and 12 hex digits.
    pub id: String,
    /// SHA-256 of the secret.
    pub hash: [u8; 32],
    /// When it was created, ms.
    pub created_at_ms: i64,
    /// When it stops enrolling, ms; `None` never.
    pub expires_at_ms: Option<i64>,
    /// How many agents it may enrol; `None` no limit.
    pub max_uses: Option<u32>,
    /// How many it has enrolled.
    pub uses: u32,
    /// Carried onto the agents it enrols.
    pub labels: BTreeMap<String, String>,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<i64>,
}

impl EnrollToken {
    /// Whether it may enrol one more agent at `now_ms`, or the code that says why not.
    pub fn usable(&self, now_ms: i64) -> Result<(), ErrorCode> {
        if self.revoked_at_ms.is_some() {
            return Err(ErrorCode::EnrollTokenRevoked);
        }
        if self.expires_at_ms.is_some_and(|t| now_ms >= t) {
            return Err(ErrorCode::EnrollTokenExpired);
        }
        if self.max_uses.is_some_and(|m| self.uses >= m) {
            return Err(ErrorCode::EnrollTokenUsedUp);
        }
        Ok(())
    }

    /// Checks the labels' bounds.
    pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
        if labels.len() > MAX_TOKEN_LABELS {
            return Err(format!("at most {MAX_TOKEN_LABELS} labels"));
        }
        for (k, v) in labels {
            let key_ok = !k.is_empty()
                && k.len() <= MAX_LABEL_KEY_BYTES
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/'));
            if !key_ok {
                return Err(format!(
                    "label keys are 1 to {MAX_LABEL_KEY_BYTES} of [A-Za-z0-9_./-], got {k:?}"
                ));
            }
            if v.len() > MAX_LABEL_VALUE_BYTES || v.chars().any(char::is_control) {
                return Err(format!(
                    "label values are at most {MAX_LABEL_VALUE_BYTES} bytes without control characters"
                ));
            }
        }
        Ok(())
    }
}

/// The SHA-256 of a token's secret: what is stored and looked up.
pub fn token_hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// How an agent came to be enrolled, shown in `GET /v1/agents`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrolment {
    /// The token that enrolled it.
    pub token_id: String,
    /// The token's labels at the time.
    pub labels: BTreeMap<String, String>,
}

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
    /// Unknown, with a usable enrolment token (this one): register it.
    Enrol(String),
    /// Refuse with this code.
    Refuse(ErrorCode),
}

/// Decides on an agent from its record (if any), the token it presented, and the stored token
/// whose hash matches it (looked up by the caller).
pub fn admit(
    existing: Option<&AgentRecord>,
    presented: Option<&[u8]>,
    token: Option<&EnrollToken>,
    now_ms: i64,
) -> Admission {
    match (existing, presented) {
        (Some(rec), _) if rec.revoked_at_ms.is_some() => Admission::Refuse(ErrorCode::RevokedAgent),
        (Some(_), _) => Admission::Known,
        (None, None) => Admission::Refuse(ErrorCode::UnknownAgent),
        (None, Some(t)) => {
            let Some(tok) =
                token.filter(|k| !t.is_empty() && bool::from(token_hash(t).ct_eq(&k.hash)))
            else {
                return Admission::Refuse(ErrorCode::InvalidEnrollToken);
            };
            match tok.usable(now_ms) {
                Ok(()) => Admission::Enrol(tok.id.clone()),
                Err(code) => Admission::Refuse(code),
            }
        }
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

    fn token(secret: &[u8]) -> EnrollToken {
        EnrollToken {
            id: "et_000000000001".into(),
            hash: token_hash(secret),
            created_at_ms: 0,
            expires_at_ms: Some(100),
            max_uses: Some(1),
            uses: 0,
            labels: BTreeMap::new(),
            revoked_at_ms: None,
        }
    }

    #[test]
    fn rules() {
        let t = token(b"t");
        let enrol = Admission::Enrol(t.id.clone());
        assert_eq!(
            admit(None, None, Some(&t), 0),
            Admission::Refuse(ErrorCode::UnknownAgent)
        );
        assert_eq!(
            admit(None, Some(b"x"), Some(&t), 0),
            Admission::Refuse(ErrorCode::InvalidEnrollToken),
            "a token whose hash does not match"
        );
        assert_eq!(
            admit(None, Some(b"x"), None, 0),
            Admission::Refuse(ErrorCode::InvalidEnrollToken)
        );
        assert_eq!(admit(None, Some(b"t"), Some(&t), 0), enrol);
        assert_eq!(admit(Some(&rec(false)), None, None, 0), Admission::Known);
        assert_eq!(
            admit(Some(&rec(true)), Some(b"t"), Some(&t), 0),
            Admission::Refuse(ErrorCode::RevokedAgent)
        );
        assert_eq!(
            admit(None, Some(b""), Some(&token(b"")), 0),
            Admission::Refuse(ErrorCode::InvalidEnrollToken)
        );
    }

    #[test]
    fn tokens_expire_run_out_and_are_revoked() {
        let mut t = token(b"t");
        assert_eq!(t.usable(99), Ok(()));
        assert_eq!(t.usable(100), Err(ErrorCode::EnrollTokenExpired));
        t.uses = 1;
        assert_eq!(
            admit(None, Some(b"t"), Some(&t), 0),
            Admission::Refuse(ErrorCode::EnrollTokenUsedUp)
        );
        t.max_uses = None;
        t.expires_at_ms = None;
        assert_eq!(t.usable(i64::MAX), Ok(()), "no limit, no expiry");
        t.revoked_at_ms = Some(5);
        assert_eq!(t.usable(0), Err(ErrorCode::EnrollTokenRevoked));
    }

    #[test]
    fn labels_are_bounded() {
        let ok: BTreeMap<_, _> = [("env".to_string(), "prod".to_string())].into();
        assert!(EnrollToken::check_labels(&ok).is_ok());
        let bad_key: BTreeMap<_, _> = [("a b".to_string(), String::new())].into();
        assert!(EnrollToken::check_labels(&bad_key).is_err());
        let many: BTreeMap<_, _> = (0..17).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(EnrollToken::check_labels(&many).is_err());
    }
}

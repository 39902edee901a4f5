//! Deltas and batches, and their signatures.
//!
//! A batch is signed over its canonical encoding: the postcard bytes of [`BatchBody`], prefixed
//! with a domain tag. The signed bytes travel as they are ([`SignedBatch::body`]), so the
//! collector verifies exactly what was signed and decodes only after the signature holds.

use crate::bounded::{BoundedBytes, BoundedVec, LimitError, Sig64};
use crate::names::{CustomerId, Dimensions, MeterName};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;

/// Most deltas in one batch.
pub const MAX_DELTAS_PER_BATCH: usize = 10_000;
/// Most bytes of an encoded batch body.
pub const MAX_BATCH_BODY_BYTES: usize = 8 * 1024 * 1024;
/// Length of the default time bucket of a delta.
pub const BUCKET_MS: i64 = 60_000;

const BATCH_DOMAIN: &[u8] = b"tally/1 batch\0";

/// An agent's identity: the first 16 bytes of SHA-256 of its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentId(pub [u8; 16]);

impl AgentId {
    /// Derives the id of a public key.
    pub fn from_public_key(key: &VerifyingKey) -> Self {
        let digest = Sha256::digest(key.as_bytes());
        let mut id = [0; 16];
        id.copy_from_slice(&digest[..16]);
        AgentId(id)
    }

    /// The id as a number, for building 128-bit ledger ids.
    pub fn as_u128(&self) -> u128 {
        u128::from_be_bytes(self.0)
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let mut id = [0; 16];
        hex::decode_to_slice(s, &mut id).ok()?;
        Some(AgentId(id))
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({self})")
    }
}

/// The aggregate of events with the same customer, meter, dimensions and time bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    /// Who pays.
    pub customer: CustomerId,
    /// What was used.
    pub meter: MeterName,
    /// At most four dimensions.
    pub dimensions: Dimensions,
    /// Start of the time bucket, ms since the Unix epoch.
    pub bucket_start_ms: i64,
    /// Sum of the quantities.
    #[serde(with = "crate::wire_decimal")]
    pub sum: Decimal,
    /// Number of events.
    pub count: u64,
    /// Quantity of the event with the latest timestamp.
    #[serde(with = "crate::wire_decimal")]
    pub last: Decimal,
    /// Timestamp of the first event, ms.
    pub first_at_ms: i64,
    /// Timestamp of the last event, ms.
    pub last_at_ms: i64,
}

/// Why a delta is not consistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    /// A negative sum or last value.
    #[error("quantities must not be negative")]
    Negative,
    /// A delta of no events.
    #[error("a delta must count at least one event")]
    ZeroCount,
    /// Timestamps out of order or outside the bucket.
    #[error("timestamps are out of order or outside the bucket")]
    Timestamps,
    /// An event time too far from the batch's seal (see [`MAX_EVENT_AGE_AT_SEAL_MS`]).
    #[error("event time is more than 400 days before or 1 hour after the batch was sealed")]
    OutOfWindow,
}

impl Delta {
    /// The delta of one event at `at_ms`.
    pub fn single(
        customer: CustomerId,
        meter: MeterName,
        dimensions: Dimensions,
        at_ms: i64,
        quantity: Decimal,
    ) -> Self {
        Delta {
            customer,
            meter,
            dimensions,
            bucket_start_ms: bucket_start(at_ms),
            sum: quantity,
            count: 1,
            last: quantity,
            first_at_ms: at_ms,
            last_at_ms: at_ms,
        }
    }

    /// Checks the rules a collector enforces before posting.
    pub fn validate(&self) -> Result<(), DeltaError> {
        if self.sum.is_sign_negative() && !self.sum.is_zero()
            || self.last.is_sign_negative() && !self.last.is_zero()
        {
            return Err(DeltaError::Negative);
        }
        if self.count == 0 {
            return Err(DeltaError::ZeroCount);
        }
        let end = self.bucket_start_ms.saturating_add(BUCKET_MS);
        if self.first_at_ms > self.last_at_ms
            || self.first_at_ms < self.bucket_start_ms
            || self.last_at_ms >= end
        {
            return Err(DeltaError::Timestamps);
        }
        Ok(())
    }

    /// [`Delta::validate`], and the event times within the outer bounds around `sealed_at_ms`.
    pub fn validate_at(&self, sealed_at_ms: i64) -> Result<(), DeltaError> {
        self.validate()?;
        if self.first_at_ms < sealed_at_ms.saturating_sub(MAX_EVENT_AGE_AT_SEAL_MS)
            || self.last_at_ms > sealed_at_ms.saturating_add(MAX_EVENT_LEAD_AT_SEAL_MS)
        {
            return Err(DeltaError::OutOfWindow);
        }
        Ok(())
    }
}

/// How far before its batch's seal an event may be, checked by the collector whatever the
/// agent's own window (Stripe's −35 days by default): far wider, it refuses wrong clocks (events
/// dated year 1), not late usage.
pub const MAX_EVENT_AGE_AT_SEAL_MS: i64 = 400 * 86_400_000;
/// How far after its batch's seal an event may be (the agent's default allows 5 minutes).
pub const MAX_EVENT_LEAD_AT_SEAL_MS: i64 = 3_600_000;

/// Start of the bucket that holds `at_ms`.
pub fn bucket_start(at_ms: i64) -> i64 {
    at_ms.div_euclid(BUCKET_MS) * BUCKET_MS
}

/// The signed content of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchBody {
    /// The sealing agent.
    pub agent_id: AgentId,
    /// Fixed for the life of the agent's local store.
    pub epoch: u64,
    /// Counts up from 1 within the epoch.
    pub seq: u64,
    /// When the batch was sealed, ms since the Unix epoch.
    pub sealed_at_ms: i64,
    /// The deltas.
    pub deltas: BoundedVec<Delta, MAX_DELTAS_PER_BATCH>,
}

/// Why a batch could not be built, sealed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    /// Too many deltas.
    #[error(transparent)]
    TooLarge(#[from] LimitError),
    /// `seq` 0 is reserved: sequences start at 1.
    #[error("seq must start at 1")]
    ZeroSeq,
    /// The encoding failed or is over [`MAX_BATCH_BODY_BYTES`].
    #[error("batch body cannot be encoded within {MAX_BATCH_BODY_BYTES} bytes")]
    Encode,
    /// The signature does not verify.
    #[error("batch signature does not verify")]
    BadSignature,
    /// The signed body does not decode.
    #[error("batch body is malformed: {0}")]
    Malformed(String),
    /// The body names another agent than the key that signed it.
    #[error("batch names agent {claimed} but was signed by {signer}")]
    AgentMismatch {
        /// Agent named in the body.
        claimed: AgentId,
        /// Agent whose key signed it.
        signer: AgentId,
    },
}

impl BatchBody {
    /// Builds a body, checking the limits.
    pub fn new(
        agent_id: AgentId,
        epoch: u64,
        seq: u64,
        sealed_at_ms: i64,
        deltas: Vec<Delta>,
    ) -> Result<Self, BatchError> {
        if seq == 0 {
            return Err(BatchError::ZeroSeq);
        }
        Ok(BatchBody {
            agent_id,
            epoch,
            seq,
            sealed_at_ms,
            deltas: BoundedVec::new(deltas)?,
        })
    }

    /// The canonical encoding that is signed.
    pub fn canonical_bytes(&self) -> Result<Vec<u8>, BatchError> {
        let bytes = postcard::to_stdvec(self).map_err(|_| BatchError::Encode)?;
        if bytes.len() > MAX_BATCH_BODY_BYTES {
            return Err(BatchError::Encode);
        }
        Ok(bytes)
    }
}

/// A batch as it travels and as the agent keeps it on disk: the signed bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedBatch {
    /// The canonical encoding of the [`BatchBody`].
    pub body: BoundedBytes<MAX_BATCH_BODY_BYTES>,
    /// ed25519 over the domain tag and `body`.
    pub signature: Sig64,
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(BATCH_DOMAIN.len() + body.len());
    m.extend_from_slice(BATCH_DOMAIN);
    m.extend_from_slice(body);
    m
}

impl SignedBatch {
    /// Encodes and signs `body`.
    pub fn seal(body: &BatchBody, key: &SigningKey) -> Result<Self, BatchError> {
        let bytes = body.canonical_bytes()?;
        let signature = key.sign(&signed_message(&bytes));
        Ok(SignedBatch {
            body: BoundedBytes::new(bytes)?,
            signature: Sig64(signature.to_bytes()),
        })
    }

    /// Decodes the body without checking the signature: only for showing a batch that cannot
    /// be verified (an agent's quarantine), never for ingesting one.
    pub fn decode_unverified(&self) -> Result<BatchBody, BatchError> {
        postcard::from_bytes::<BatchBody>(&self.body)
            .map_err(|e| BatchError::Malformed(e.to_string()))
    }

    /// Verifies the signature with `key`, then decodes the body and checks it names the signer.
    pub fn verify(&self, key: &VerifyingKey) -> Result<BatchBody, BatchError> {
        let sig = ed25519_dalek::Signature::from_bytes(&self.signature.0);
        key.verify_strict(&signed_message(&self.body), &sig)
            .map_err(|_| BatchError::BadSignature)?;
        let (body, rest) = postcard::take_from_bytes::<BatchBody>(&self.body)
            .map_err(|e| BatchError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(BatchError::Malformed(String::from("trailing bytes")));
        }
        if body.seq == 0 {
            return Err(BatchError::ZeroSeq);
        }
        let signer = AgentId::from_public_key(key);
        if body.agent_id != signer {
            return Err(BatchError::AgentMismatch {
                claimed: body.agent_id,
                signer,
            });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(key: &SigningKey) -> BatchBody {
        let d = Delta::single(
            CustomerId::new("acme").unwrap(),
            MeterName::new("api_calls").unwrap(),
            Dimensions::from_strs([("model", "gpt")]).unwrap(),
            1_700_000_012_345,
            Decimal::new(25, 1),
        );
        BatchBody::new(
            AgentId::from_public_key(&key.verifying_key()),
            9,
            1,
            1_700_000_013_000,
            vec![d],
        )
        .unwrap()
    }

    #[test]
    fn every_tampered_byte_fails_verification() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let signed = SignedBatch::seal(&body(&key), &key).unwrap();
        assert_eq!(signed.verify(&key.verifying_key()).unwrap(), body(&key));
        for i in 0..signed.body.len() {
            let mut bytes = signed.body.to_vec();
            bytes[i] ^= 0x01;
            let t = SignedBatch {
                body: BoundedBytes::new(bytes).unwrap(),
                signature: signed.signature,
            };
            assert_eq!(
                t.verify(&key.verifying_key()),
                Err(BatchError::BadSignature),
                "byte {i}"
            );
        }
        for i in 0..64 {
            let mut s = signed.clone();
            s.signature.0[i] ^= 0x80;
            assert!(s.verify(&key.verifying_key()).is_err());
        }
    }

    #[test]
    fn other_key_fails() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let signed = SignedBatch::seal(&body(&key), &key).unwrap();
        assert_eq!(
            signed.verify(&other.verifying_key()),
            Err(BatchError::BadSignature)
        );
        // Signed by `other` but claiming `key`'s id.
        let forged = SignedBatch::seal(&body(&key), &other).unwrap();
        assert!(matches!(
            forged.verify(&other.verifying_key()),
            Err(BatchError::AgentMismatch { .. })
        ));
    }

    #[test]
    fn delta_rules() {
        let mut d = body(&SigningKey::from_bytes(&[1; 32])).deltas[0].clone();
        assert!(d.validate().is_ok());
        d.count = 0;
        assert_eq!(d.validate(), Err(DeltaError::ZeroCount));
        d.count = 1;
        d.sum = Decimal::NEGATIVE_ONE;
        assert_eq!(d.validate(), Err(DeltaError::Negative));
        d.sum = Decimal::ONE;
        d.last_at_ms = d.bucket_start_ms + BUCKET_MS;
        assert_eq!(d.validate(), Err(DeltaError::Timestamps));
        assert_eq!(bucket_start(-1), -BUCKET_MS);
    }
}

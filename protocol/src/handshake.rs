//! The handshake: the agent proves it holds its key, on this connection only.
//!
//! ```text
//! agent                                   collector
//!   Hello{version, public_key, token?} ──▶
//!                                     ◀── Challenge{nonce}
//!   Proof{sign(domain‖binding‖nonce‖key)} ──▶
//!                                     ◀── Welcome{agent_id} | Error{code}
//! ```
//!
//! `binding` is supplied by the caller on both sides and must be unique to the connection: over
//! QUIC it is TLS exporter material (RFC 5705), which both ends derive from the same session and an
//! attacker relaying the handshake cannot reproduce. A proof captured on one connection therefore
//! fails on every other, and the collector's state machine accepts one proof only.
//!
//! Registration policy (known, enrolled, revoked keys) is the collector's, not this module's: the
//! server side returns the authenticated key and the token, and the caller decides.

use crate::PROTOCOL_VERSION;
use crate::batch::AgentId;
use crate::bounded::{BoundedBytes, Sig64};
use crate::error::ErrorCode;
use crate::frame::{Challenge, Hello, MAX_TOKEN_BYTES, Proof, Welcome};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

const HANDSHAKE_DOMAIN: &[u8] = b"tally/1 handshake\0";

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The peer speaks another protocol version.
    #[error("protocol version {0} is not supported")]
    UnsupportedVersion(u16),
    /// A message arrived out of order, or a second time.
    #[error("unexpected handshake message")]
    Unexpected,
    /// The public key is not a valid ed25519 point.
    #[error("public key is not valid")]
    BadKey,
    /// The proof does not verify for this connection and nonce.
    #[error("proof does not verify")]
    BadProof,
    /// The welcome names another agent id than ours.
    #[error("collector named agent {got}, expected {expected}")]
    WrongAgent {
        /// Ours.
        expected: AgentId,
        /// Theirs.
        got: AgentId,
    },
    /// The enrolment token is over the limit.
    #[error("enrolment token is longer than {MAX_TOKEN_BYTES} bytes")]
    TokenTooLong,
}

impl HandshakeError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            HandshakeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            HandshakeError::Unexpected => ErrorCode::UnexpectedFrame,
            HandshakeError::BadKey | HandshakeError::BadProof => ErrorCode::BadProof,
            HandshakeError::WrongAgent { .. } => ErrorCode::AgentMismatch,
            HandshakeError::TokenTooLong => ErrorCode::InvalidEnrollToken,
        }
    }
}

fn proof_message(binding: &[u8], nonce: &[u8; 32], public_key: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HANDSHAKE_DOMAIN.len() + 8 + binding.len() + 64);
    m.extend_from_slice(HANDSHAKE_DOMAIN);
    m.extend_from_slice(&(binding.len() as u64).to_le_bytes());
    m.extend_from_slice(binding);
    m.extend_from_slice(nonce);
    m.extend_from_slice(public_key);
    m
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientState {
    AwaitChallenge,
    AwaitWelcome,
    Done,
}

/// The agent's side.
#[derive(Debug)]
pub struct ClientHandshake {
    key: SigningKey,
    binding: Vec<u8>,
    state: ClientState,
}

impl ClientHandshake {
    /// Starts a handshake on a connection with this `binding`; returns the hello to send.
    pub fn start(
        key: SigningKey,
        binding: Vec<u8>,
        enroll_token: Option<&str>,
    ) -> Result<(Self, Hello), HandshakeError> {
        let enroll_token = enroll_token
            .map(|t| BoundedBytes::new(t.as_bytes().to_vec()))
            .transpose()
            .map_err(|_| HandshakeError::TokenTooLong)?;
        let hello = Hello {
            version: PROTOCOL_VERSION,
            public_key: key.verifying_key().to_bytes(),
            enroll_token,
        };
        Ok((
            ClientHandshake {
                key,
                binding,
                state: ClientState::AwaitChallenge,
            },
            hello,
        ))
    }

    /// Answers the challenge with a proof.
    pub fn on_challenge(&mut self, challenge: &Challenge) -> Result<Proof, HandshakeError> {
        if self.state != ClientState::AwaitChallenge {
            return Err(HandshakeError::Unexpected);
        }
        self.state = ClientState::AwaitWelcome;
        let msg = proof_message(
            &self.binding,
            &challenge.nonce,
            self.key.verifying_key().as_bytes(),
        );
        Ok(Proof {
            signature: Sig64(self.key.sign(&msg).to_bytes()),
        })
    }

    /// Accepts the welcome; the connection is ready for batches.
    pub fn on_welcome(&mut self, welcome: &Welcome) -> Result<(), HandshakeError> {
        if self.state != ClientState::AwaitWelcome {
            return Err(HandshakeError::Unexpected);
        }
        let expected = AgentId::from_public_key(&self.key.verifying_key());
        if welcome.agent_id != expected {
            return Err(HandshakeError::WrongAgent {
                expected,
                got: welcome.agent_id,
            });
        }
        self.state = ClientState::Done;
        Ok(())
    }
}

/// What the collector learns from a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authenticated {
    /// The agent's id.
    pub agent_id: AgentId,
    /// The agent's key, for verifying its batches.
    pub public_key: VerifyingKey,
    /// The enrolment token it presented, if any.
    pub enroll_token: Option<Vec<u8>>,
}

#[derive(Debug)]
enum ServerState {
    AwaitHello,
    AwaitProof {
        hello: Box<Hello>,
        key: VerifyingKey,
    },
    Done,
}

/// The collector's side.
#[derive(Debug)]
pub struct ServerHandshake {
    binding: Vec<u8>,
    nonce: [u8; 32],
    state: ServerState,
}

impl ServerHandshake {
    /// A handshake for a connection with this `binding`; `nonce` must be fresh random bytes.
    pub fn new(binding: Vec<u8>, nonce: [u8; 32]) -> Self {
        ServerHandshake {
            binding,
            nonce,
            state: ServerState::AwaitHello,
        }
    }

    /// Checks the hello and returns the challenge to send.
    pub fn on_hello(&mut self, hello: Hello) -> Result<Challenge, HandshakeError> {
        if !matches!(self.state, ServerState::AwaitHello) {
            return Err(HandshakeError::Unexpected);
        }
        if hello.version != PROTOCOL_VERSION {
            self.state = ServerState::Done;
            return Err(HandshakeError::UnsupportedVersion(hello.version));
        }
        let key =
            VerifyingKey::from_bytes(&hello.public_key).map_err(|_| HandshakeError::BadKey)?;
        self.state = ServerState::AwaitProof {
            hello: Box::new(hello),
            key,
        };
        Ok(Challenge { nonce: self.nonce })
    }

    /// Verifies the proof. Succeeds at most once per handshake.
    pub fn on_proof(&mut self, proof: &Proof) -> Result<Authenticated, HandshakeError> {
        let ServerState::AwaitProof { hello, key } =
            std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(HandshakeError::Unexpected);
        };
        let msg = proof_message(&self.binding, &self.nonce, &hello.public_key);
        key.verify_strict(&msg, &Signature::from_bytes(&proof.signature.0))
            .map_err(|_| HandshakeError::BadProof)?;
        Ok(Authenticated {
            agent_id: AgentId::from_public_key(&key),
            public_key: key,
            enroll_token: hello.enroll_token.map(BoundedBytes::into_inner),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(binding_a: &[u8], binding_s: &[u8]) -> Result<Authenticated, HandshakeError> {
        let key = SigningKey::from_bytes(&[5; 32]);
        let (mut c, hello) = ClientHandshake::start(key, binding_a.to_vec(), Some("tok")).unwrap();
        let mut s = ServerHandshake::new(binding_s.to_vec(), [9; 32]);
        let ch = s.on_hello(hello)?;
        let proof = c.on_challenge(&ch)?;
        let auth = s.on_proof(&proof)?;
        c.on_welcome(&Welcome {
            agent_id: auth.agent_id,
            max_in_flight: 8,
        })?;
        Ok(auth)
    }

    #[test]
    fn happy_path() {
        let auth = run(b"conn-1", b"conn-1").unwrap();
        assert_eq!(auth.enroll_token.as_deref(), Some(&b"tok"[..]));
    }

    #[test]
    fn binding_mismatch_fails() {
        assert_eq!(run(b"conn-1", b"conn-2"), Err(HandshakeError::BadProof));
    }

    #[test]
    fn replayed_proof_fails_on_another_connection_and_twice_on_the_same() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let (mut c, hello) = ClientHandshake::start(key, b"conn-1".to_vec(), None).unwrap();
        let mut s1 = ServerHandshake::new(b"conn-1".to_vec(), [1; 32]);
        let proof = c
            .on_challenge(&s1.on_hello(hello.clone()).unwrap())
            .unwrap();
        assert!(s1.on_proof(&proof).is_ok());
        assert_eq!(s1.on_proof(&proof), Err(HandshakeError::Unexpected));
        // An attacker replays the captured hello and proof on a new connection.
        let mut s2 = ServerHandshake::new(b"conn-2".to_vec(), [2; 32]);
        s2.on_hello(hello.clone()).unwrap();
        assert_eq!(s2.on_proof(&proof), Err(HandshakeError::BadProof));
        // Even with the same binding, a new nonce defeats the replay.
        let mut s3 = ServerHandshake::new(b"conn-1".to_vec(), [3; 32]);
        s3.on_hello(hello).unwrap();
        assert_eq!(s3.on_proof(&proof), Err(HandshakeError::BadProof));
    }

    #[test]
    fn wrong_version_and_order() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let (_, mut hello) = ClientHandshake::start(key, vec![], None).unwrap();
        hello.version = PROTOCOL_VERSION + 1;
        let mut s = ServerHandshake::new(vec![], [0; 32]);
        assert_eq!(
            s.on_hello(hello),
            Err(HandshakeError::UnsupportedVersion(PROTOCOL_VERSION + 1))
        );
        let mut s = ServerHandshake::new(vec![], [0; 32]);
        assert_eq!(
            s.on_proof(&Proof {
                signature: Sig64([0; 64])
            }),
            Err(HandshakeError::Unexpected)
        );
    }
}

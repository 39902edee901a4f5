//! Every message on the wire, and its framing.
//!
//! A frame is a 4-byte little-endian length followed by that many bytes of postcard-encoded
//! [`Frame`]. The length is checked against [`MAX_FRAME_BYTES`] before any buffer is sized for
//! it, and every collection inside has its own limit checked while decoding.
//!
//! Transport mapping (QUIC, ALPN `tally/1`): the agent opens one bidirectional stream per
//! connection. It sends `Hello`, receives `Challenge`, sends `Proof`, receives `Welcome` (or
//! `Error`), then sends `Batch`, `EntitlementsRequest`, `LeaseRequest` and `LeaseRelease` frames;
//! the collector answers each batch with an `Ack` in the order batches arrived, each lease request
//! with a `LeaseGrant`, and pushes `Catalog` and `Entitlements` frames whenever they change.

use crate::batch::{AgentId, SignedBatch};
use crate::bounded::{BoundedBytes, Sig64};
use crate::catalog::Catalog;
use crate::entitlements::{
    EntitlementsRequest, EntitlementsSnapshot, LeaseGrant, LeaseRelease, LeaseRequest,
};
use crate::error::ErrorCode;
use serde::{Deserialize, Serialize};

/// Largest encoded frame, length prefix excluded.
pub const MAX_FRAME_BYTES: usize = 16 * 1024 * 1024;
/// Bytes of the length prefix.
pub const LENGTH_PREFIX_BYTES: usize = 4;
/// Longest enrolment token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;
/// Longest error message, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// Agent → collector: the first frame on a connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the agent speaks.
    pub version: u16,
    /// The agent's ed25519 public key.
    pub public_key: [u8; 32],
    /// Presented on first contact to register the key.
    pub enroll_token: Option<BoundedBytes<MAX_TOKEN_BYTES>>,
}

/// Collector → agent: a fresh nonce to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// Chosen by the collector for this connection.
    pub nonce: [u8; 32],
}

/// Agent → collector: the signature over the connection binding and the nonce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// See [`crate::handshake`].
    pub signature: Sig64,
}

/// Collector → agent: the handshake succeeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The agent's id as the collector derived it.
    pub agent_id: AgentId,
    /// How many unacknowledged batches the agent may have in flight on this connection.
    pub max_in_flight: u32,
}

/// The outcome of one batch, sent only once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckOutcome {
    /// Posted to the ledger.
    Committed,
    /// Already committed earlier; nothing changed.
    Duplicate,
    /// Verified but not postable; kept at the collector with this reason.
    Quarantined {
        /// Why.
        code: ErrorCode,
    },
}

/// Collector → agent: the outcome of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The batch's epoch.
    pub epoch: u64,
    /// The batch's seq.
    pub seq: u64,
    /// What happened.
    pub outcome: AckOutcome,
}

/// Either side: something went wrong; the sender closes the connection after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorFrame {
    /// The stable code.
    pub code: ErrorCode,
    /// Lowercase detail for logs; never contains secrets.
    pub message: BoundedBytes<MAX_MESSAGE_BYTES>,
}

impl ErrorFrame {
    /// Builds an error frame, cutting the message to the limit on a character boundary.
    pub fn new(code: ErrorCode, message: &str) -> Self {
        let mut end = message.len().min(MAX_MESSAGE_BYTES);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = BoundedBytes::new(message.as_bytes()[..end].to_vec()).unwrap_or_default();
        ErrorFrame { code, message }
    }

    /// The message as text (lossy).
    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.message).into_owned()
    }
}

/// Everything that crosses the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Challenge`].
    Challenge(Challenge),
    /// See [`Proof`].
    Proof(Proof),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// A sealed, signed batch.
    Batch(SignedBatch),
    /// See [`Ack`].
    Ack(Ack),
    /// The meter catalog.
    Catalog(Catalog),
    /// An entitlement snapshot.
    Entitlements(EntitlementsSnapshot),
    /// A lease request.
    LeaseRequest(LeaseRequest),
    /// A lease grant.
    LeaseGrant(LeaseGrant),
    /// See [`ErrorFrame`].
    Error(ErrorFrame),
    /// See [`EntitlementsRequest`].
    EntitlementsRequest(EntitlementsRequest),
    /// See [`LeaseRelease`].
    LeaseRelease(LeaseRelease),
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The length prefix is over [`MAX_FRAME_BYTES`].
    #[error("frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// The payload does not decode as a frame.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

impl FrameError {
    /// The wire code for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::TooLarge(_) => ErrorCode::FrameTooLarge,
            FrameError::Malformed(_) => ErrorCode::Malformed,
        }
    }
}

/// Encodes a frame with its length prefix.
pub fn encode_frame(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0; LENGTH_PREFIX_BYTES];
    out = postcard::to_extend(frame, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - LENGTH_PREFIX_BYTES;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    out[..LENGTH_PREFIX_BYTES].copy_from_slice(&(len as u32).to_le_bytes());
    Ok(out)
}

/// Reads the length prefix: `Ok(None)` until four bytes are there.
pub fn frame_len(bytes: &[u8]) -> Result<Option<usize>, FrameError> {
    let Some(prefix) = bytes.get(..LENGTH_PREFIX_BYTES) else {
        return Ok(None);
    };
    let mut p = [0; LENGTH_PREFIX_BYTES];
    p.copy_from_slice(prefix);
    let len = u32::from_le_bytes(p) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(len));
    }
    Ok(Some(len))
}

/// Decodes one frame payload (without its length prefix). Trailing bytes are an error.
pub fn decode_payload(payload: &[u8]) -> Result<Frame, FrameError> {
    if payload.len() > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(payload.len()));
    }
    let (frame, rest) =
        postcard::take_from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(String::from("trailing bytes")));
    }
    // postcard accepts overlong varints (`0x80 0x00` for 0); a frame has one encoding only, so
    // anything that does not re-encode to the same bytes is refused. Cheap: a batch frame's body
    // is copied, not re-encoded (the signature binds those bytes).
    let canonical =
        postcard::to_stdvec(&frame).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if canonical != payload {
        return Err(FrameError::Malformed(String::from(
            "non-canonical encoding",
        )));
    }
    Ok(frame)
}

/// Decodes the first frame of `bytes`: `Ok(None)` if it is not all there yet, otherwise the
/// frame and the number of bytes it used.
pub fn decode_frame(bytes: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    let Some(len) = frame_len(bytes)? else {
        return Ok(None);
    };
    let Some(payload) = bytes.get(LENGTH_PREFIX_BYTES..LENGTH_PREFIX_BYTES + len) else {
        return Ok(None);
    };
    Ok(Some((decode_payload(payload)?, LENGTH_PREFIX_BYTES + len)))
}

/// Buffers a byte stream and yields whole frames of at most a limit (by default
/// [`MAX_FRAME_BYTES`]; a peer that has not authenticated yet gets a much smaller one). The buffer
/// never holds more than one frame beyond what the caller pushed since the last frame, so its
/// size is bounded by the limit plus one read. After an error the stream is unusable.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            buf: Vec::new(),
            limit: MAX_FRAME_BYTES,
        }
    }
}

impl FrameDecoder {
    /// An empty decoder with the protocol's limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// Frames longer than `limit` bytes (capped at [`MAX_FRAME_BYTES`]) are refused as
    /// [`FrameError::TooLarge`] as soon as their prefix arrives.
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.min(MAX_FRAME_BYTES);
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    fn checked_len(&self) -> Result<Option<usize>, FrameError> {
        match frame_len(&self.buf)? {
            Some(len) if len > self.limit => Err(FrameError::TooLarge(len)),
            other => Ok(other),
        }
    }

    /// The next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        self.checked_len()?;
        match decode_frame(&self.buf)? {
            Some((frame, used)) => {
                self.buf.drain(..used);
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// Whether a whole frame (or an error) is buffered, so the next [`Self::next_frame`] does not
    /// need more bytes. A reader must drain these before waiting on the transport: a peer may
    /// have sent several frames in one read.
    pub fn has_frame(&self) -> bool {
        match self.checked_len() {
            Ok(Some(len)) => self.buf.len() >= LENGTH_PREFIX_BYTES + len,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_length_prefix_is_refused() {
        let mut bytes = vec![0xff, 0xff, 0xff, 0x7f];
        bytes.extend_from_slice(&[0; 8]);
        assert!(matches!(decode_frame(&bytes), Err(FrameError::TooLarge(_))));
        let limit = (MAX_FRAME_BYTES as u32 + 1).to_le_bytes();
        assert!(matches!(decode_frame(&limit), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let f = Frame::Challenge(Challenge { nonce: [3; 32] });
        let bytes = encode_frame(&f).unwrap();
        let mut d = FrameDecoder::new();
        for b in &bytes[..bytes.len() - 1] {
            d.push(std::slice::from_ref(b));
            assert_eq!(d.next_frame(), Ok(None));
        }
        assert!(!d.has_frame());
        d.push(&bytes[bytes.len() - 1..]);
        assert!(d.has_frame());
        assert_eq!(d.next_frame(), Ok(Some(f)));
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn a_decoder_limit_refuses_a_long_frame_at_its_prefix() {
        let f = Frame::Challenge(Challenge { nonce: [3; 32] });
        let bytes = encode_frame(&f).unwrap();
        let mut d = FrameDecoder::new();
        d.set_limit(8);
        d.push(&bytes[..LENGTH_PREFIX_BYTES]);
        assert!(d.has_frame(), "the error is ready without the payload");
        assert!(matches!(d.next_frame(), Err(FrameError::TooLarge(_))));
        let mut d = FrameDecoder::new();
        d.set_limit(bytes.len() - LENGTH_PREFIX_BYTES);
        d.push(&bytes);
        assert_eq!(d.next_frame(), Ok(Some(f)));
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        let mut bytes = encode_frame(&Frame::Challenge(Challenge { nonce: [3; 32] })).unwrap();
        bytes.push(0);
        let len = (bytes.len() - LENGTH_PREFIX_BYTES) as u32;
        bytes[..4].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            decode_frame(&bytes),
            Err(FrameError::Malformed(_))
        ));
    }

    #[test]
    fn overlong_varints_are_refused() {
        // Found by the decode_frame fuzzer: an Ack whose epoch 0 is written as `0x80 0x00`.
        let bytes = [5, 0, 0, 0, 5, 128, 0, 0, 0];
        assert!(matches!(
            decode_frame(&bytes),
            Err(FrameError::Malformed(_))
        ));
        let canonical = [4, 0, 0, 0, 5, 0, 0, 0];
        assert!(matches!(
            decode_frame(&canonical),
            Ok(Some((Frame::Ack(_), 8)))
        ));
    }

    #[test]
    fn error_frame_cuts_long_messages_on_a_char_boundary() {
        let e = ErrorFrame::new(ErrorCode::Internal, &"é".repeat(MAX_MESSAGE_BYTES));
        assert!(e.message.len() <= MAX_MESSAGE_BYTES);
        assert!(std::str::from_utf8(&e.message).is_ok());
    }
}

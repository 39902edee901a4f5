//! The language agents and collectors speak, with no I/O, no clock and no async runtime.
//!
//! - [`names`]: validated customer, meter and dimension names.
//! - [`batch`]: deltas, batches and their ed25519 signatures over a canonical encoding.
//! - [`frame`]: every message on the wire, length-prefixed postcard with hard limits enforced
//!   while decoding.
//! - [`handshake`]: the connection-bound proof of key possession, as two small state machines.
//! - [`catalog`], [`entitlements`]: what the collector pushes to agents.
//! - [`error`]: the stable error codes that cross the wire.
//!
//! Callers supply time (milliseconds since the Unix epoch) and randomness, so every rule here is
//! deterministic under test.
//!
//! ```
//! use tally_protocol::{batch::*, frame::*, names::*};
//! use rust_decimal::Decimal;
//!
//! let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
//! let delta = Delta::single(
//!     CustomerId::new("acme")?, MeterName::new("api_calls")?, Dimensions::default(),
//!     1_700_000_000_000, Decimal::new(15, 1),
//! );
//! let body = BatchBody::new(AgentId::from_public_key(&key.verifying_key()), 1, 1, 1_700_000_000_500, vec![delta])?;
//! let frame = Frame::Batch(SignedBatch::seal(&body, &key)?);
//! let bytes = encode_frame(&frame)?;
//! let (decoded, used) = decode_frame(&bytes)?.expect("a whole frame");
//! assert_eq!(used, bytes.len());
//! let Frame::Batch(signed) = decoded else { unreachable!() };
//! assert_eq!(signed.verify(&key.verifying_key())?, body);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod batch;
pub mod bounded;
pub mod catalog;
pub mod entitlements;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzz;
pub mod handshake;
pub mod names;
pub mod wire_decimal;

pub use ed25519_dalek;
pub use rust_decimal::Decimal;

/// The protocol version carried in every hello; a collector refuses versions it does not speak.
pub const PROTOCOL_VERSION: u16 = 2;

/// The QUIC ALPN identifier of this protocol version.
pub const ALPN: &[u8] = b"tally/1";

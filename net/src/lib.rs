//! The QUIC plumbing agent and collector share, and nothing else: the TLS configurations
//! ([`tls`]) and length-prefixed frames on a quinn stream ([`frames`]). Sessions — what the frames
//! mean — are sans-IO state machines in the agent and the collector; this crate only moves bytes.
//!
//! ```no_run
//! # async fn demo(ca_pem: &[u8], conn: quinn::Connection) -> Result<(), Box<dyn std::error::Error>> {
//! use tally_net::frames::{FrameReader, write_frame};
//! use tally_protocol::frame::{Frame, Challenge};
//!
//! let _client = tally_net::tls::client_config(ca_pem)?;
//! let (mut send, recv) = conn.open_bi().await?;
//! write_frame(&mut send, &Frame::Challenge(Challenge { nonce: [0; 32] })).await?;
//! let mut reader = FrameReader::new(recv);
//! let _reply: Frame = reader.next().await?;
//! # Ok(()) }
//! ```

#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod frames;
pub mod tls;

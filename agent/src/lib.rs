//! The Tally agent library: what product teams link into their servers (SPEC §3).
//!
//! ```text
//! record() ─▶ aggregate (per-thread shards) ─▶ sealer ─▶ store (redb, fsync) ─▶ shipper ══QUIC══▶ collector
//! record_durable() ─▶ durable log (group commit) ─┘                ▲ acks delete ─┘
//! ```
//!
//! - [`aggregate`]: the hot path; no I/O, no allocation once a key is seen.
//! - [`sealer`]: a plain state machine numbering and cutting deltas into batches, and the thread
//!   that seals every `flush_interval`.
//! - [`store`]: the local redb store and its format and guarantees.
//! - [`session`]: the collector session as a sans-IO state machine: handshake, in-flight
//!   window, acks, catalog and entitlement pushes, reconnect and failover decisions.
//! - [`shipper`]: the tokio shell around it: QUIC connect, frame I/O, store reads and writes;
//!   it reports the session's events back to the agent, which owns the state.
//! - [`metrics`]: Prometheus metrics in a per-agent registry (no exporter is installed).
//! - [`keys`]: the agent's ed25519 key file.
//! - [`entitlements`]: `check`, `limit`, `try_consume`, `reserve` answered from memory, and the
//!   lease accounting that keeps hard limits exact across agents.
//!
//! Time: every wall-clock read goes to the [`tally_clock::Clock`] given to
//! [`AgentBuilder::clock`] (the system clock by default), except the `record()` hot path, which
//! stamps usage with [`tally_clock::coarse_now_ms`]: a few nanoseconds, accurate to a scheduler
//! tick, far finer than the one-minute buckets usage is aggregated into.
//!
//! Guarantees (SPEC A1–A4): a batch is fsynced before it is sent and deleted only when
//! acknowledged; a `kill -9` loses at most the last `flush_interval` of `record()` usage and
//! nothing `record_durable` acknowledged; over the disk budget the [`Overflow`] policy applies;
//! resends are harmless because the collector dedups them.
//!
//! The library only emits: `tracing` events and spans without a subscriber, metrics through
//! [`Agent::render_metrics`].

mod agent;
pub mod aggregate;
mod asym;
pub mod config;
pub mod entitlements;
pub mod error;
pub mod event;
pub mod keys;
pub mod metrics;
pub mod sealer;
pub mod seglog;
pub mod session;
pub mod shipper;
pub mod status;
pub mod store;

pub use agent::{Agent, AgentBuilder, Counter, DURABLE_QUEUE, SEAL_QUEUE};
pub use config::Overflow;
pub use entitlements::{
    ConsumeError, Consumed, DecidedBy, Decision, EntitlementsConfig, Limit, OfflinePolicy,
    Reservation,
};
pub use error::{FlushError, RecordError, SealError, ShutdownError, StartError, StoreError};
pub use event::{Event, Recorded};
pub use status::{ConnectionState, Status};
pub use tally_protocol::Decimal;

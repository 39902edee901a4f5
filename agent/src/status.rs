//! What `Agent::status()` reports (SPEC §3): backlog, connection, acknowledgements, snapshots.

use std::time::Duration;
use tally_protocol::batch::AgentId;

/// The shipper's connection, as last seen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// No collector is configured, or the shipper has not started yet.
    Idle,
    /// Connecting to this collector.
    Connecting {
        /// The address being tried.
        collector: String,
    },
    /// Handshake done; batches flow.
    Connected {
        /// The collector's address.
        collector: String,
        /// Batches allowed in flight.
        max_in_flight: u32,
    },
    /// The last attempt or connection failed; retrying after a backoff.
    Disconnected {
        /// Why (lowercase, no secrets).
        last_error: String,
    },
    /// The agent was shut down.
    Closed,
}

/// A snapshot of the agent's state.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// The agent's id.
    pub agent_id: AgentId,
    /// The local store's epoch.
    pub epoch: u64,
    /// Sealed batches not yet acknowledged.
    pub backlog_batches: u64,
    /// Bytes of those batches plus the durable log's unsealed rows.
    pub backlog_bytes: u64,
    /// `record_durable` events in the log, not yet sealed.
    pub durable_log_events: u64,
    /// Age of the oldest unacknowledged batch.
    pub oldest_unacked_age: Option<Duration>,
    /// Highest seq sealed (0 before the first batch).
    pub last_sealed_seq: u64,
    /// Highest seq acknowledged since start.
    pub last_acked_seq: Option<u64>,
    /// The connection.
    pub connection: ConnectionState,
    /// Why the last connection attempt or connection failed, if one did.
    pub last_error: Option<String>,
    /// Age of the entitlement snapshot (since the collector built it).
    pub entitlements_age: Option<Duration>,
    /// Version of the catalog in use.
    pub catalog_version: Option<u64>,
    /// True while the backlog is at or over the disk budget.
    pub over_budget: bool,
    /// True once the collector refused this agent as revoked (until a collector welcomes it).
    pub revoked: bool,
    /// Batches kept in the store's quarantine, never to be sent: signed by a key this agent no
    /// longer holds, or refused by the collector as `bad_signature`. `Agent::quarantined` lists
    /// them; they are not part of the backlog.
    pub quarantined_batches: u64,
    /// Why the last write to the agent's disk (durable log or store) failed, until one succeeds
    /// again: the agent is not ready while this is set (a full disk, a failing device).
    pub disk_error: Option<String>,
}

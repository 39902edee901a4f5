//! The agent's error types: one enum per operation, every variant documented.
//!
//! Hot-path errors ([`RecordError`]) carry no heap data, so refusing a call allocates nothing.

use tally_protocol::names::{DimensionsError, NameError};

/// Why `record`, `record_with`, `record_event` or `Counter::add` refused a quantity.
/// Nothing is recorded when an error is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The customer key is not 1–128 bytes of UTF-8 without control characters.
    #[error("invalid customer: {0}")]
    InvalidCustomer(NameError),
    /// The meter name is not `[a-z0-9_.-]{1,64}`.
    #[error("invalid meter: {0}")]
    InvalidMeter(NameError),
    /// The dimensions are not valid (too many, repeated key, bad key or value).
    #[error("invalid dimensions: {0}")]
    InvalidDimensions(DimensionsError),
    /// The event id is empty or longer than 256 bytes.
    #[error("event id must be 1 to 256 bytes")]
    InvalidEventId,
    /// The collector's catalog is known and has no meter of this name.
    #[error("meter is not in the catalog")]
    UnknownMeter,
    /// Quantities must be zero or more.
    #[error("quantity must not be negative")]
    NegativeQuantity,
    /// The disk budget is used up and the overflow policy is `reject` (SPEC A3).
    #[error("disk budget is used up")]
    OverBudget,
    /// The agent was shut down.
    #[error("agent is shut down")]
    Closed,
    /// The collector revoked this agent: what it records durably could never be delivered, so
    /// `record_durable` refuses (enrol a new key with a new token).
    #[error("the collector revoked this agent")]
    Revoked,
    /// The local store failed (only for operations that read the disk, such as an event id check).
    #[error("local store failed: {0}")]
    Store(String),
    /// The event's own time is outside the configured window (default: more than 35 days ago or
    /// more than 5 minutes ahead, as Stripe refuses).
    #[error("event time is outside the accepted window (35 days back, 5 minutes ahead by default)")]
    EventTimeOutOfRange,
}

impl From<StoreError> for RecordError {
    fn from(e: StoreError) -> Self {
        RecordError::Store(e.to_string())
    }
}

impl RecordError {
    /// A short stable label, used as the `reason` of the record-error metric.
    pub fn reason(&self) -> &'static str {
        match self {
            RecordError::InvalidCustomer(_) => "invalid_customer",
            RecordError::InvalidMeter(_) => "invalid_meter",
            RecordError::InvalidDimensions(_) => "invalid_dimensions",
            RecordError::UnknownMeter => "unknown_meter",
            RecordError::NegativeQuantity => "negative_quantity",
            RecordError::OverBudget => "over_budget",
            RecordError::Closed => "closed",
            RecordError::Store(_) => "store",
            RecordError::InvalidEventId => "invalid_event_id",
            RecordError::EventTimeOutOfRange => "event_time_out_of_range",
            RecordError::Revoked => "revoked",
        }
    }

    /// Index into the per-shard error counters.
    pub(crate) fn index(&self) -> usize {
        match self {
            RecordError::InvalidCustomer(_) => 0,
            RecordError::InvalidMeter(_) => 1,
            RecordError::InvalidDimensions(_) => 2,
            RecordError::UnknownMeter => 3,
            RecordError::NegativeQuantity => 4,
            RecordError::OverBudget => 5,
            RecordError::Closed => 6,
            RecordError::Store(_) => 7,
            RecordError::InvalidEventId => 8,
            RecordError::EventTimeOutOfRange => 9,
            RecordError::Revoked => 10,
        }
    }
}

/// Number of [`RecordError`] kinds, for per-shard counters.
pub(crate) const RECORD_ERROR_KINDS: usize = 11;
/// The labels of [`RecordError::index`], in order.
pub(crate) const RECORD_ERROR_REASONS: [&str; RECORD_ERROR_KINDS] = [
    "invalid_customer",
    "invalid_meter",
    "invalid_dimensions",
    "unknown_meter",
    "negative_quantity",
    "over_budget",
    "closed",
    "store",
    "invalid_event_id",
    "event_time_out_of_range",
    "revoked",
];

/// The local store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// redb reported an error.
    #[error("database error: {0}")]
    Db(Box<redb::Error>),
    /// A row does not decode: the file was written by something else or is damaged.
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The store file is missing, empty or foreign: refused, and left as it is.
    #[error(transparent)]
    File(#[from] tally_storefile::StoreFileError),
    /// The durable log (`data_dir/log/`) failed or is damaged.
    #[error(transparent)]
    Log(#[from] crate::seglog::LogError),
    /// A file next to the database (the agent key) could not be read or written.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn db(e: impl Into<redb::Error>) -> Self {
        StoreError::Db(Box::new(e.into()))
    }
}

/// Why [`crate::AgentBuilder::start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A required setting is missing or a setting is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The deployment CA PEM holds no usable certificate.
    #[error("invalid CA certificate: {0}")]
    Ca(String),
    /// The local store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The QUIC endpoint could not be created.
    #[error("cannot create the QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
}

/// Why a seal did not store its batches. The usage it drained from memory is carried to the next
/// attempt; durable-log rows stay in the log.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// A batch could not be built or signed (a protocol limit).
    #[error("batch: {0}")]
    Batch(#[from] tally_protocol::batch::BatchError),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The sealer thread is gone (the agent is shutting down).
    #[error("sealer stopped")]
    Stopped,
}

/// Why [`crate::Agent::flush`] or [`crate::Agent::seal`] did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// Sealing failed: the local store could not be written.
    #[error("sealing failed: {0}")]
    Seal(#[source] SealError),
    /// Not everything sealed was acknowledged in time; it stays on disk and keeps being shipped.
    #[error("timed out with {unacked} batches unacknowledged")]
    Timeout {
        /// Batches still waiting for an acknowledgement.
        unacked: u64,
    },
    /// The agent was shut down.
    #[error("agent is shut down")]
    Closed,
}

/// Why [`crate::Agent::shutdown`] did not ship everything. What is unacknowledged stays on disk
/// and goes out on the next start.
#[derive(Debug, thiserror::Error)]
pub enum ShutdownError {
    /// The final seal failed; the usage recorded since the last seal is lost.
    #[error("final seal failed: {0}")]
    Seal(#[source] SealError),
    /// Some batches were not acknowledged before the timeout; they stay on disk.
    #[error("{unacked} batches were not acknowledged before the timeout; they stay on disk")]
    Unacked {
        /// Batches still on disk.
        unacked: u64,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tally_protocol::names::{CustomerId, MeterName};

    #[test]
    fn reasons_and_indexes_agree() {
        let errors = [
            RecordError::InvalidCustomer(CustomerId::validate("").unwrap_err()),
            RecordError::InvalidMeter(MeterName::validate("Bad").unwrap_err()),
            RecordError::InvalidDimensions(DimensionsError::TooMany(5)),
            RecordError::UnknownMeter,
            RecordError::NegativeQuantity,
            RecordError::OverBudget,
            RecordError::Closed,
            RecordError::from(StoreError::Corrupt {
                table: "t",
                detail: String::new(),
            }),
            RecordError::InvalidEventId,
            RecordError::EventTimeOutOfRange,
            RecordError::Revoked,
        ];
        for e in &errors {
            assert_eq!(RECORD_ERROR_REASONS[e.index()], e.reason());
            let text = e.to_string();
            assert!(!text.ends_with('.'), "{text}");
            assert!(text.starts_with(|c: char| c.is_lowercase()), "{text}");
        }
        assert_eq!(errors.len(), RECORD_ERROR_KINDS);
    }
}

//! The one interface of a running destination (decision 0107): Stripe's forwarder and the Orb
//! and Metronome feeds all implement [`Destination`], so the collector keeps one list of them
//! and starts, wakes, lists, retries and stops each the same way.
//!
//! What differs stays typed: [`Status`], [`Listing`] and [`Retried`] carry each family's own
//! shapes (the admin API's JSON is theirs, unchanged); what only one destination has
//! (Stripe's webhooks and event-summary reconciliation, Orb's event search) is reached through
//! [`Destination::as_any`] on the concrete handle.
//!
//! Guarantees: every implementation runs on its own task with its own store rows, pacing,
//! retries and dead letters; no method waits on another destination. [`Destination::list`] and
//! [`Destination::retry`] call the store and block: call them off the async threads.

use std::future::Future;
use std::pin::Pin;

use serde::{Deserialize, Serialize};

use crate::ledger_feed::runner::{DestinationStatus, OutboxView};
use crate::ledger_feed::store::FwdStats;
use crate::ledger_feed::{Engine, FwdGroup};
use crate::stripe::ForwarderStatus;
use crate::stripe::outbox::{OutboxEntry, OutboxStats, StoreError};

/// Which destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// Stripe Billing meter events.
    Stripe,
    /// Orb.
    Orb,
    /// Metronome.
    Metronome,
}

impl DestinationKind {
    /// `stripe`, `orb` or `metronome` (the `destination` query parameter).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stripe => "stripe",
            Self::Orb => "orb",
            Self::Metronome => "metronome",
        }
    }

    /// The decimal engine, for Orb and Metronome.
    pub fn engine(self) -> Option<Engine> {
        match self {
            Self::Stripe => None,
            Self::Orb => Some(Engine::Orb),
            Self::Metronome => Some(Engine::Metronome),
        }
    }
}

impl From<Engine> for DestinationKind {
    fn from(e: Engine) -> Self {
        match e {
            Engine::Orb => Self::Orb,
            Engine::Metronome => Self::Metronome,
        }
    }
}

/// A destination's counters and last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Stripe: unmapped rows per customer, requests, unknown-outcome checks, last error.
    Stripe(ForwarderStatus),
    /// Orb or Metronome: requests, events delivered, last error.
    Feed(DestinationStatus),
}

impl Status {
    /// The last error (no secrets).
    pub fn last_error(&self) -> Option<&str> {
        match self {
            Self::Stripe(s) => s.last_error.as_deref(),
            Self::Feed(s) => s.last_error.as_deref(),
        }
    }
}

/// One page of a destination's outbox.
#[derive(Debug, Clone)]
pub enum Listing {
    /// Stripe outbox rows and counts over the whole outbox.
    Stripe {
        /// Rows in the asked state.
        data: Vec<OutboxEntry>,
        /// Counts.
        stats: OutboxStats,
    },
    /// Orb or Metronome events and counts.
    Feed {
        /// Events in the asked state.
        data: Vec<OutboxView>,
        /// Counts.
        stats: FwdStats,
    },
}

/// What an operator retry returned to the queue.
#[derive(Debug, Clone)]
pub enum Retried {
    /// Stripe: the rows of the dead event, back to pending with a new identifier revision.
    Rows(Vec<u64>),
    /// Orb or Metronome: the event, back to open under its same key.
    Group(Box<FwdGroup>),
}

/// Why a listing or a retry failed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The asked state is not one of the destination's.
    #[error("{0}")]
    InvalidState(String),
    /// No such row or event.
    #[error("{0}")]
    NotFound(String),
    /// The row or event is not a dead letter (nothing changed).
    #[error("{0}")]
    NotDead(String),
    /// Stripe's outbox store failed.
    #[error(transparent)]
    Outbox(StoreError),
    /// An Orb or Metronome store failed.
    #[error("{0}")]
    Store(String),
}

/// The future [`Destination::shutdown`] returns.
pub type Shutdown<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// A running destination.
pub trait Destination: Send + Sync + 'static {
    /// Which one.
    fn kind(&self) -> DestinationKind;

    /// Asks for a pass now (after a ledger commit or a mapping change); never waits.
    fn notify(&self);

    /// Counters and the last error.
    fn status(&self) -> Status;

    /// Its outbox in `state` (`None`: the destination's default) with id after `after`, at
    /// most `limit`, and its counts. Blocks on the store.
    fn list(
        &self,
        state: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Listing, DestinationError>;

    /// An operator's retry of dead letter `id`: back to the queue under the same identity, so
    /// a copy the destination did take is deduplicated; wakes the destination. Blocks on the
    /// store.
    fn retry(&self, id: u64) -> Result<Retried, DestinationError>;

    /// Stops after the requests in flight are answered and recorded.
    fn shutdown(&self) -> Shutdown<'_>;

    /// The concrete handle, for what only this destination has.
    fn as_any(&self) -> &dyn std::any::Any;
}

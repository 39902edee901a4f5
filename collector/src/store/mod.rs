//! The storage boundary: what the collector keeps, behind one small trait, so that another
//! ledger (PostgreSQL, SPEC §6.5) can sit beside the embedded one.
//!
//! Owns [`Store`] and the records it keeps: agents, dedup state, recorded batches, accounts,
//! transfers, quarantine, the versioned catalog and adjustments' idempotency keys.
//!
//! Guarantees every implementation gives:
//! - [`Store::ingest`] records the dedup state, the ledger transfers and account totals (or the
//!   quarantine record) of a group of batches in **one atomic, durable transaction**: when it
//!   returns `Ok`, every outcome it reports survives a crash; when it returns `Err`, nothing of
//!   the group was written.
//! - Transfers are append-only: nothing ever edits or deletes one.
//! - Reads see only committed state.

use crate::core::dedup::DedupState;
pub use crate::core::ingest::{
    BatchOutcome, BatchRecord, IngestBatch, IngestOutcome, QuarantineRecord,
};
use crate::core::ledger::{Account, Adjustment, Period, Rejection, Transfer, VerifyReport};
pub use crate::core::registry::AgentRecord;
use crate::core::registry::{EnrollToken, Enrolment};
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::{Catalog, MeterDef};
use tally_protocol::error::ErrorCode;
use tally_protocol::names::{CustomerId, MeterName};

/// What destination names are set for: a meter or a customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A meter: Orb `event_name`, Metronome `event_type`.
    Meter,
    /// A customer: Orb `external_customer_id`, Metronome customer id or ingest alias.
    Customer,
}

impl NameKind {
    /// `meter` or `customer` (the stores' key).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Meter => "meter",
            Self::Customer => "customer",
        }
    }
}

/// A meter's or customer's names at Orb and Metronome, set through `PUT /v1/meters/{m}` /
/// `PUT /v1/customers/{c}` (SPEC §6.4b). Stored as JSON beside the catalog and the customer
/// record, not in them: the catalog is the agents' postcard wire type and agents do not need
/// these (decision 0124). `None`: the configuration's default.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DestNames {
    /// Orb `event_name` (meter) or `external_customer_id` (customer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orb: Option<String>,
    /// Metronome `event_type` (meter) or `customer_id` (customer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metronome: Option<String>,
}

impl DestNames {
    /// Nothing set.
    pub fn is_empty(&self) -> bool {
        self.orb.is_none() && self.metronome.is_none()
    }
}

pub(crate) fn names_enc(n: &DestNames) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(n).map_err(|e| StoreError::Invariant(format!("dest names: {e}")))
}

pub(crate) fn names_dec(b: &[u8]) -> Result<DestNames, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Corrupt {
        table: "dest_names",
        detail: e.to_string(),
    })
}

/// A customer's settings (`PUT /v1/customers/{customer}`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CustomerRecord {
    /// The Stripe customer (`cus_…`) usage is forwarded to.
    pub stripe_customer_id: Option<String>,
    /// The plan (must name a stored plan; see `crate::core::entitlements`).
    pub plan: Option<String>,
}

/// The catalog once `def` is put into `current` (replacing a meter of that name, version + 1), or
/// `None` when `current` holds it as it is: the one rule of every store's `put_meter`.
pub(crate) fn catalog_with(
    current: &Catalog,
    def: &MeterDef,
) -> Result<Option<Catalog>, StoreError> {
    if current.meter(def.name.as_str()) == Some(def) {
        return Ok(None);
    }
    let mut meters: Vec<MeterDef> = current
        .meters
        .iter()
        .filter(|m| m.name != def.name)
        .cloned()
        .collect();
    meters.push(def.clone());
    meters.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Some(Catalog {
        version: current.version + 1,
        meters: tally_protocol::bounded::BoundedVec::new(meters)
            .map_err(|e| StoreError::Invariant(e.to_string()))?,
    }))
}

/// The error of a stored record of `table` that fails its check after a read: corruption, for
/// every store the same way.
pub(crate) fn corrupt_record(
    table: &'static str,
) -> impl Fn(crate::core::ingest::RecordError) -> StoreError {
    move |e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    }
}

/// A storage failure. The operation changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed (I/O, transaction, table, commit).
    #[error("storage: {0}")]
    Redb(#[from] ::redb::Error),
    /// A record could not be encoded.
    #[error("encode: {0}")]
    Encode(#[from] postcard::Error),
    /// The system's random source failed (a new store's namespace).
    #[error("random source: {0}")]
    Random(getrandom::Error),
    /// The store's file is of another format than this build reads.
    #[error("store format {found} is newer than this build reads ({supported})")]
    Format {
        /// The format recorded in the file.
        found: u64,
        /// The newest format this build reads.
        supported: u64,
    },
    /// The Stripe outbox layer failed.
    #[error("stripe outbox: {0}")]
    Outbox(#[from] tally_forward::stripe::outbox::StoreError),
    /// A stored record does not decode.
    #[error("corrupt record in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What failed.
        detail: String,
    },
    /// The store file is missing, empty or foreign: refused, and left as it is.
    #[error(transparent)]
    File(#[from] tally_storefile::StoreFileError),
    /// A ledger invariant would break; the transaction was aborted.
    #[error("ledger invariant: {0}")]
    Invariant(String),
    /// PostgreSQL failed (after the retries of transient failures).
    #[error("postgres: {0}")]
    Postgres(#[from] ::postgres::Error),
}

macro_rules! redb_error {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(e.into())
            }
        }
    )*};
}
redb_error!(
    ::redb::DatabaseError,
    ::redb::TransactionError,
    ::redb::TableError,
    ::redb::StorageError,
    ::redb::CommitError
);

impl From<getrandom::Error> for StoreError {
    fn from(e: getrandom::Error) -> Self {
        StoreError::Random(e)
    }
}

/// The outcome of [`Store::adjust`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdjustOutcome {
    /// Posted now.
    Created(Transfer),
    /// Posted earlier with the same fields; nothing changed.
    Exists(Transfer),
    /// The idempotency key was used with different fields (the field named).
    ExistsWithDifferent(&'static str),
    /// Cannot be posted.
    Rejected(Rejection),
}

/// Per-epoch ingest state of an agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochState {
    /// The agent.
    pub agent: AgentId,
    /// The epoch.
    pub epoch: u64,
    /// Its dedup state.
    pub dedup: DedupState,
}

/// The collector's storage. It is also the Stripe outbox ([`tally_forward::stripe::OutboxStore`]): the
/// rows are written by [`Store::ingest`] and [`Store::adjust`] in their ledger transaction
/// (SPEC §6.4), and the forwarder works them through the outbox methods.
pub trait Store: tally_forward::stripe::OutboxStore + EnrolmentStore {
    /// Dedups and posts (or quarantines) a group of verified batches in one durable transaction,
    /// in order; returns one outcome per batch.
    fn ingest(
        &self,
        batches: &[IngestBatch],
        now_ms: i64,
    ) -> Result<Vec<IngestOutcome>, StoreError>;
    /// Posts an adjustment, idempotently by its key.
    fn adjust(&self, adj: &Adjustment, now_ms: i64) -> Result<AdjustOutcome, StoreError>;

    /// The agent with this id.
    fn agent(&self, id: AgentId) -> Result<Option<AgentRecord>, StoreError>;
    /// Inserts or replaces an agent record.
    fn put_agent(&self, rec: &AgentRecord) -> Result<(), StoreError>;
    /// Every agent.
    fn agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Every epoch's dedup state.
    fn epochs(&self) -> Result<Vec<EpochState>, StoreError>;

    /// The current catalog.
    fn catalog(&self) -> Result<Catalog, StoreError>;
    /// Adds or replaces a meter; returns the new catalog (version + 1), or the current one
    /// unchanged when the definition is identical.
    fn put_meter(&self, def: &MeterDef) -> Result<Catalog, StoreError>;

    /// Usage accounts of a customer, optionally of one meter and period.
    fn usage_accounts(
        &self,
        customer: &CustomerId,
        meter: Option<&MeterName>,
        period: Option<Period>,
    ) -> Result<Vec<Account>, StoreError>;
    /// Customer keys that start with `prefix` and sort after `after` (exclusive), in order, at
    /// most `limit`: those with usage and those with settings (the console's search).
    fn customers(&self, prefix: &str, after: &str, limit: usize)
    -> Result<Vec<String>, StoreError>;
    /// Transfers after position `after` (exclusive), optionally of one customer, at most `limit`;
    /// each with its position.
    fn entries(
        &self,
        customer: Option<&CustomerId>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Transfer)>, StoreError>;
    /// Quarantined batches after position `after`, at most `limit`.
    fn quarantined(&self, after: u64, limit: usize) -> Result<Vec<QuarantineRecord>, StoreError>;
    /// Checks every ledger invariant.
    fn verify(&self) -> Result<VerifyReport, StoreError>;

    /// Outbox rows appended since the store was opened (the committer wakes the forwarder when
    /// this moves).
    fn outbox_appended(&self) -> u64;
    /// A customer's settings.
    fn customer(&self, customer: &str) -> Result<Option<CustomerRecord>, StoreError>;
    /// Stores a customer's settings (`PUT /v1/customers/{customer}`).
    fn put_customer(&self, customer: &str, rec: &CustomerRecord) -> Result<(), StoreError>;
    /// The destination names set for those of `keys` that have any, in key order.
    fn dest_names(
        &self,
        kind: NameKind,
        keys: &[String],
    ) -> Result<Vec<(String, DestNames)>, StoreError>;
    /// Stores `key`'s destination names (empty: removes them).
    fn put_dest_names(
        &self,
        kind: NameKind,
        key: &str,
        names: &DestNames,
    ) -> Result<(), StoreError>;
    /// Every outbox row as (customer, Stripe event name, bucket time in Unix seconds, units):
    /// what Stripe should have, for reconciliation.
    fn outbox_items(&self) -> Result<Vec<(String, String, i64, u64)>, StoreError>;

    /// Claims the job `name` for `holder` until `until_ms`, or renews the claim it holds; false
    /// while another holder's claim runs (past `now_ms`). Collectors sharing a store take turns
    /// this way (the analytics export, decision 0098); a store one process owns (redb) always
    /// grants it.
    fn claim(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> Result<bool, StoreError> {
        let _ = (name, holder, now_ms, until_ms);
        Ok(true)
    }
}

/// Enrolment tokens (only their hashes) and how each agent was enrolled.
pub trait EnrolmentStore {
    /// Adds a token; `false` when its id or hash exists already. Past
    /// [`MAX_ENROLL_TOKENS`](crate::core::registry::MAX_ENROLL_TOKENS) spent tokens are dropped
    /// to make room, and if none is spent the call fails.
    fn create_enroll_token(&self, t: &EnrollToken, now_ms: i64) -> Result<bool, StoreError>;
    /// Every token.
    fn enroll_tokens(&self) -> Result<Vec<EnrollToken>, StoreError>;
    /// The token whose secret hashes to `hash`.
    fn enroll_token_by_hash(&self, hash: &[u8; 32]) -> Result<Option<EnrollToken>, StoreError>;
    /// Revokes a token (idempotent); `None` when there is no such token.
    fn revoke_enroll_token(&self, id: &str, now_ms: i64)
    -> Result<Option<EnrollToken>, StoreError>;
    /// Enrols `rec` with the token hashing to `token_hash`, in one transaction: checks the token
    /// is usable, counts the use, writes the agent and its enrolment. The inner error is the
    /// wire code when the token is not usable (nothing written).
    fn enrol(
        &self,
        rec: &AgentRecord,
        token_hash: &[u8; 32],
        now_ms: i64,
    ) -> Result<Result<EnrollToken, ErrorCode>, StoreError>;
    /// How `agent` was enrolled (none for agents enrolled before tokens were objects).
    fn enrolment(&self, agent: AgentId) -> Result<Option<Enrolment>, StoreError>;
}

pub mod entitlements;
pub mod memory;
pub mod postgres;
pub mod redb;

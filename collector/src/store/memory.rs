//! The in-memory reference store: the model the embedded store is checked against. It holds
//! the same records in plain maps and runs the same ingest rules ([`ingest_group`]) through the
//! same trait, so a test compares storage, not two copies of the rules.
//!
//! Guarantees: [`MemoryLedger::ingest`] is all or nothing (it works on a copy and keeps it only
//! when the group succeeds), like a store transaction.

use crate::core::dedup::DedupState;
use crate::core::ingest::{
    BatchRecord, IngestBatch, IngestOutcome, IngestTxn, QuarantineRecord, ingest_group,
};
use crate::core::ledger::{
    Account, AccountId, AccountKey, Accounts, Period, Posting, Transfer, WorkingSet,
};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::Catalog;

/// Why the reference store refused a write (a broken rule, as the embedded store's
/// `StoreError::Invariant`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// A batch was recorded twice.
    #[error("batch {agent} {epoch} {seq} recorded twice")]
    RecordedTwice {
        /// The agent.
        agent: AgentId,
        /// The epoch.
        epoch: u64,
        /// The seq.
        seq: u64,
    },
}

/// A whole collector ledger in memory.
#[derive(Debug, Clone, Default)]
pub struct MemoryLedger {
    /// The catalog postings are checked against.
    pub catalog: Catalog,
    /// Dedup state per `(agent, epoch)`.
    pub dedup: HashMap<(AgentId, u64), DedupState>,
    /// Recorded batches.
    pub batches: BTreeMap<(AgentId, u64, u64), BatchRecord>,
    /// Accounts.
    pub accounts: HashMap<AccountId, Account>,
    /// Transfers, position `i + 1` at index `i`.
    pub transfers: Vec<Transfer>,
    /// Quarantined batches, position `i + 1` at index `i`.
    pub quarantine: Vec<QuarantineRecord>,
    /// Outbox writes: the transfer, whether usage went up, the bucket time in seconds.
    pub outbox: Vec<(Transfer, bool, i64)>,
}

impl MemoryLedger {
    /// An empty ledger with `catalog`.
    pub fn new(catalog: Catalog) -> Self {
        MemoryLedger {
            catalog,
            ..Self::default()
        }
    }

    /// Ingests a group of verified batches, all or nothing.
    pub fn ingest(
        &mut self,
        batches: &[IngestBatch],
        now_ms: i64,
    ) -> Result<Vec<IngestOutcome>, MemoryError> {
        let mut next = self.clone();
        let catalog = self.catalog.clone();
        let out = ingest_group(&mut next, &catalog, batches, now_ms)?;
        *self = next;
        Ok(out)
    }

    /// The usage (sum of balances) of a customer's meter in a period, over every dimension set.
    pub fn usage(&self, customer: &str, meter: &str, period: Period) -> Decimal {
        self.accounts
            .values()
            .filter(|a| {
                matches!(&a.key, AccountKey::Usage { customer: c, meter: m, period: p, .. }
                    if c.as_str() == customer && m.as_str() == meter && *p == period)
            })
            .map(Account::balance)
            .sum()
    }
}

impl Accounts for MemoryLedger {
    type Error = MemoryError;
    fn load(&mut self, id: AccountId) -> Result<Option<Account>, MemoryError> {
        Ok(self.accounts.get(&id).cloned())
    }
}

impl IngestTxn for MemoryLedger {
    fn dedup_state(&mut self, agent: AgentId, epoch: u64) -> Result<DedupState, MemoryError> {
        Ok(self.dedup.get(&(agent, epoch)).cloned().unwrap_or_default())
    }

    fn epoch_count(&mut self, agent: AgentId) -> Result<usize, MemoryError> {
        Ok(self.dedup.keys().filter(|(a, _)| *a == agent).count())
    }

    fn next_quarantine_id(&mut self) -> Result<u64, MemoryError> {
        Ok(self.quarantine.len() as u64 + 1)
    }

    fn append(&mut self, posting: &Posting) -> Result<u64, MemoryError> {
        let first = self.transfers.len() as u64 + 1;
        self.transfers.extend(posting.transfers.iter().cloned());
        Ok(first)
    }

    fn outbox(
        &mut self,
        _catalog: &Catalog,
        transfer: &Transfer,
        positive: bool,
        bucket_s: i64,
    ) -> Result<(), MemoryError> {
        self.outbox.push((transfer.clone(), positive, bucket_s));
        Ok(())
    }

    fn quarantine(&mut self, rec: &QuarantineRecord) -> Result<(), MemoryError> {
        self.quarantine.push(rec.clone());
        Ok(())
    }

    fn record_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        rec: &BatchRecord,
    ) -> Result<(), MemoryError> {
        if self
            .batches
            .insert((agent, epoch, seq), rec.clone())
            .is_some()
        {
            return Err(MemoryError::RecordedTwice { agent, epoch, seq });
        }
        Ok(())
    }

    fn put_dedup(
        &mut self,
        agent: AgentId,
        epoch: u64,
        state: &DedupState,
    ) -> Result<(), MemoryError> {
        self.dedup.insert((agent, epoch), state.clone());
        Ok(())
    }

    fn put_accounts(&mut self, ws: &WorkingSet) -> Result<(), MemoryError> {
        for (id, a) in &ws.accounts {
            self.accounts.insert(*id, a.clone());
        }
        Ok(())
    }
}

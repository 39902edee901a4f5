//! The in-memory reference store: the model the embedded store is checked against. It holds
//! the same records in plain maps and runs the same ingest rules ([`ingest_group`]) through the
//! same trait, so a test compares storage, not two copies of the rules.
//!
//! Guarantees: [`MemoryLedger::ingest`] is all or nothing (it works on a copy and keeps it only
//! when the group succeeds), like a store transaction.

use crate::core::dedup::DedupState;
use crate::core::entitlements::lease::{Lease, LeaseBookLimits, LeaseChange, LeaseCounters};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ingest::{
    BatchRecord, IngestBatch, IngestOutcome, IngestTxn, QuarantineRecord, ingest_group,
};
use crate::core::ledger::{
    Account, AccountId, AccountKey, Accounts, Period, Posting, Transfer, WorkingSet,
};
use crate::store::StoreError;
use crate::store::entitlements::{
    EntitlementStore, GrantOutcome, LeaseRows, MAX_GRANTS_PER_CUSTOMER, release_in, request_in,
    tick_in,
};
use rust_decimal::Decimal;
use std::collections::{BTreeMap, HashMap};
use tally_protocol::batch::AgentId;
use tally_protocol::catalog::Catalog;
use tally_protocol::entitlements::{LeaseGrant, LeaseRelease, LeaseRequest};
use tally_protocol::names::{CustomerId, MeterName, PlanName};

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

/// The reference [`EntitlementStore`]: plain maps behind one lock, grants posted with the same
/// ledger rule ([`crate::core::ledger::post_grant`]) into its own accounts and transfers, and
/// usage recorded directly by tests ([`MemoryEntitlements::add_usage`]).
#[derive(Debug, Default)]
pub struct MemoryEntitlements {
    inner: std::sync::Mutex<EntInner>,
}

#[derive(Debug, Default)]
struct EntInner {
    plans: BTreeMap<PlanName, Plan>,
    settings: BTreeMap<CustomerId, CustomerSettings>,
    grants: BTreeMap<String, Grant>,
    accounts: HashMap<AccountId, Account>,
    transfers: Vec<Transfer>,
    usage: Vec<(CustomerId, MeterName, i64, Decimal)>,
    leases: BTreeMap<u64, Lease>,
    next_lease: u64,
    /// Committed-through seq per (agent, epoch), set by tests.
    watermarks: HashMap<(AgentId, u64), u64>,
}

impl LeaseRows for EntInner {
    fn lock_limit(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Vec<Lease>, StoreError> {
        Ok(self
            .leases
            .values()
            .filter(|l| l.customer == *customer && l.meter == *meter)
            .cloned()
            .collect())
    }

    fn of_agents(&mut self, agents: &[AgentId]) -> Result<Vec<Lease>, StoreError> {
        Ok(self
            .leases
            .values()
            .filter(|l| agents.contains(&l.agent))
            .cloned()
            .collect())
    }

    fn due(&mut self, before_ms: i64) -> Result<Vec<Lease>, StoreError> {
        Ok(self
            .leases
            .values()
            .filter(|l| l.reclaimed_at_ms.is_none() && l.expires_at_ms <= before_ms)
            .cloned()
            .collect())
    }

    fn forget_tombstones(&mut self, before_ms: i64) -> Result<(), StoreError> {
        self.leases
            .retain(|_, l| l.reclaimed_at_ms.is_none_or(|r| r >= before_ms));
        Ok(())
    }

    fn watermark(&mut self, agent: AgentId, epoch: u64) -> Result<u64, StoreError> {
        Ok(self.watermarks.get(&(agent, epoch)).copied().unwrap_or(0))
    }

    fn used(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        Ok(self
            .usage
            .iter()
            .filter(|(c, m, at, _)| c == customer && m == meter && period.contains(*at))
            .map(|u| u.3)
            .sum())
    }

    fn count(&mut self) -> Result<usize, StoreError> {
        Ok(self.leases.len())
    }

    fn next_id(&mut self) -> Result<u64, StoreError> {
        self.next_lease = self.next_lease.max(1);
        let id = self.next_lease;
        self.next_lease += 1;
        Ok(id)
    }

    fn write(&mut self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        for c in changes {
            match c {
                LeaseChange::Put(l) => {
                    self.leases.insert(l.id, l.clone());
                }
                LeaseChange::Delete(id) => {
                    self.leases.remove(id);
                }
            }
        }
        Ok(())
    }
}

impl MemoryEntitlements {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, EntInner> {
        // A panic while held leaves plain maps; keep serving them.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records usage of a customer's meter at `at_ms` (the reference for `used`).
    pub fn add_usage(&self, customer: &CustomerId, meter: &MeterName, at_ms: i64, qty: Decimal) {
        self.lock()
            .usage
            .push((customer.clone(), meter.clone(), at_ms, qty));
    }

    /// Records that `agent`'s batches of `epoch` through `seq` are committed (what a ledger's
    /// dedup watermark says), for releases.
    pub fn set_committed_through(&self, agent: AgentId, epoch: u64, seq: u64) {
        self.lock().watermarks.insert((agent, epoch), seq);
    }

    /// The grant transfers posted, in order.
    pub fn transfers(&self) -> Vec<Transfer> {
        self.lock().transfers.clone()
    }
}

impl EntitlementStore for MemoryEntitlements {
    fn plan(&self, name: &PlanName) -> Result<Option<Plan>, StoreError> {
        Ok(self.lock().plans.get(name).cloned())
    }

    fn put_plan(&self, name: &PlanName, plan: &Plan) -> Result<(), StoreError> {
        self.lock().plans.insert(name.clone(), plan.clone());
        Ok(())
    }

    fn settings(&self, customer: &CustomerId) -> Result<CustomerSettings, StoreError> {
        Ok(self
            .lock()
            .settings
            .get(customer)
            .cloned()
            .unwrap_or_default())
    }

    fn put_settings(&self, customer: &CustomerId, s: &CustomerSettings) -> Result<(), StoreError> {
        self.lock().settings.insert(customer.clone(), s.clone());
        Ok(())
    }

    fn grant(&self, req: &GrantRequest, now_ms: i64) -> Result<GrantOutcome, StoreError> {
        let mut g = self.lock();
        if let Some(stored) = g.grants.get(&req.idempotency_key) {
            return Ok(match stored.request.differs_from(req) {
                None => GrantOutcome::Exists(stored.clone()),
                Some(f) => GrantOutcome::ExistsWithDifferent(f),
            });
        }
        let n = g
            .grants
            .values()
            .filter(|x| x.request.customer == req.customer)
            .count();
        if n >= MAX_GRANTS_PER_CUSTOMER {
            return Ok(GrantOutcome::Rejected(crate::core::ledger::Rejection {
                code: tally_protocol::error::ErrorCode::Overloaded,
                row: None,
                message: format!("a customer has at most {MAX_GRANTS_PER_CUSTOMER} grants"),
            }));
        }
        let mut ws = WorkingSet::new();
        let mut base = g.accounts.clone();
        let posting = match crate::core::ledger::post_grant(
            &mut ws,
            &mut base,
            &req.customer,
            &req.meter,
            req.quantity,
            &req.idempotency_key,
            now_ms,
        ) {
            Ok(Ok(p)) => p,
            Ok(Err(r)) => return Ok(GrantOutcome::Rejected(r)),
            Err(never) => match never {},
        };
        ws.assert_balanced();
        let Some(t) = posting.transfers.first().cloned() else {
            return Err(StoreError::Invariant(String::from("empty grant posting")));
        };
        for (id, a) in ws.accounts {
            g.accounts.insert(id, a);
        }
        g.transfers.push(t.clone());
        let grant = Grant {
            request: req.clone(),
            transfer_id: t.id,
            position: g.transfers.len() as u64,
            created_at_ms: now_ms,
        };
        g.grants.insert(req.idempotency_key.clone(), grant.clone());
        Ok(GrantOutcome::Created(grant))
    }

    fn grants(&self, customer: &CustomerId) -> Result<Vec<Grant>, StoreError> {
        Ok(self
            .lock()
            .grants
            .values()
            .filter(|g| g.request.customer == *customer)
            .cloned()
            .collect())
    }

    fn used(
        &self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        Ok(self
            .lock()
            .usage
            .iter()
            .filter(|(c, m, at, _)| c == customer && m == meter && period.contains(*at))
            .map(|u| u.3)
            .sum())
    }

    fn customers_for_stripe(&self, stripe_customer: &str) -> Result<Vec<CustomerId>, StoreError> {
        // No customer records here: only a key that is the Stripe id maps.
        Ok(CustomerId::new(stripe_customer).into_iter().collect())
    }

    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        Ok(self.lock().leases.values().cloned().collect())
    }

    fn customer_leases(&self, customer: &CustomerId) -> Result<Vec<Lease>, StoreError> {
        Ok(self
            .lock()
            .leases
            .values()
            .filter(|l| l.customer == *customer)
            .cloned()
            .collect())
    }

    fn lease_request(
        &self,
        agent: AgentId,
        req: &LeaseRequest,
        limit: Decimal,
        period: PeriodRange,
        limits: LeaseBookLimits,
        now_ms: i64,
    ) -> Result<(LeaseGrant, LeaseCounters), StoreError> {
        request_in(&mut *self.lock(), agent, req, limit, period, limits, now_ms)
    }

    fn lease_release(
        &self,
        agent: AgentId,
        rel: &LeaseRelease,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        release_in(&mut *self.lock(), agent, rel, limits)
    }

    fn lease_tick(
        &self,
        now_ms: i64,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        tick_in(&mut *self.lock(), now_ms, limits)
    }
}

//! The storage boundary of entitlements: plans, customers' entitlement settings, grants (each a
//! ledger transfer) and leases, behind one small trait beside [`super::Store`], so another
//! backend (PostgreSQL) can implement it on its own.
//!
//! Guarantees every implementation gives:
//! - [`EntitlementStore::grant`] records the grant and posts its ledger transfer
//!   (`GrantSource{meter}` → `Grants{customer, meter}`, id from the idempotency key) in one
//!   atomic, durable transaction; a repeated key with the same request returns the stored grant
//!   and writes nothing; with a different request it is refused, naming the field.
//! - The lease book's truth is the store's (decision 0095): every lease operation (a request,
//!   a release, a reclaim) is one store transaction that loads the leases it can touch, runs
//!   the pure [`LeaseBook`] over them and writes its changes back; a request reads `used` in
//!   that transaction after locking its limit, so Σ outstanding over every collector + used ≤
//!   limit. Committed usage reaches its lease (`shipped`) in the ingest transaction that posts
//!   it, so `used` and `shipped` move together: no reader ever counts a unit twice or never.

use super::StoreError;
use crate::core::entitlements::lease::{
    Lease, LeaseBook, LeaseBookLimits, LeaseChange, LeaseCounters, LimitInput, batch_usage,
};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ledger::Rejection;
use rust_decimal::Decimal;
use std::collections::BTreeSet;
use tally_protocol::batch::AgentId;
use tally_protocol::entitlements::{LeaseGrant, LeaseRelease, LeaseRequest};
use tally_protocol::names::{CustomerId, MeterName, PlanName};

/// Tombstones of reclaimed leases are kept this long (usage consumed under one that arrives
/// later is overshoot), ms.
pub const TOMBSTONE_KEEP_MS: i64 = 24 * 3_600_000;

/// Most grants kept per customer (a request past it is refused).
pub const MAX_GRANTS_PER_CUSTOMER: usize = 10_000;

/// The outcome of [`EntitlementStore::grant`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrantOutcome {
    /// Recorded and posted now.
    Created(Grant),
    /// Recorded earlier with the same request; nothing changed.
    Exists(Grant),
    /// The idempotency key was used with a different request (the field named).
    ExistsWithDifferent(&'static str),
    /// Cannot be posted (unknown meter, too many grants, an overflow).
    Rejected(Rejection),
}

/// Where plans, customers' settings, grants and leases are kept.
pub trait EntitlementStore: Send + Sync {
    /// The plan with this name.
    fn plan(&self, name: &PlanName) -> Result<Option<Plan>, StoreError>;
    /// Adds or replaces a plan.
    fn put_plan(&self, name: &PlanName, plan: &Plan) -> Result<(), StoreError>;
    /// A customer's entitlement settings (default when none were stored).
    fn settings(&self, customer: &CustomerId) -> Result<CustomerSettings, StoreError>;
    /// Stores a customer's entitlement settings.
    fn put_settings(&self, customer: &CustomerId, s: &CustomerSettings) -> Result<(), StoreError>;
    /// Records a grant and posts its ledger transfer, idempotently by its key.
    fn grant(&self, req: &GrantRequest, now_ms: i64) -> Result<GrantOutcome, StoreError>;
    /// Every grant of a customer.
    fn grants(&self, customer: &CustomerId) -> Result<Vec<Grant>, StoreError>;
    /// A customer's usage of a meter in `period` as the ledger holds it.
    fn used(
        &self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError>;
    /// Our customers mapped to this Stripe customer (`stripe_customer_id`, or a key that is
    /// the Stripe id itself).
    fn customers_for_stripe(&self, stripe_customer: &str) -> Result<Vec<CustomerId>, StoreError>;
    /// Every lease kept, reclaimed ones (tombstones) included.
    fn leases(&self) -> Result<Vec<Lease>, StoreError>;
    /// The leases of one customer (tombstones included).
    fn customer_leases(&self, customer: &CustomerId) -> Result<Vec<Lease>, StoreError>;
    /// Answers a lease request against `limit` in `period` (from the customer's view), in one
    /// transaction that locks the limit and reads `used` under it ([`request_in`]).
    fn lease_request(
        &self,
        agent: AgentId,
        req: &LeaseRequest,
        limit: Decimal,
        period: crate::core::entitlements::period::PeriodRange,
        limits: LeaseBookLimits,
        now_ms: i64,
    ) -> Result<(LeaseGrant, LeaseCounters), StoreError>;
    /// `agent` ended a lease ([`release_in`]).
    fn lease_release(
        &self,
        agent: AgentId,
        rel: &LeaseRelease,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError>;
    /// Reclaims leases past expiry + grace and forgets old tombstones ([`tick_in`]).
    fn lease_tick(&self, now_ms: i64, limits: LeaseBookLimits)
    -> Result<LeaseCounters, StoreError>;
    /// Usage booked by this process's ingest transactions for reclaimed leases (overshoot).
    fn ingest_overshoot(&self) -> Decimal {
        Decimal::ZERO
    }
}

/// One store transaction's access to the lease rows and what lease rules read beside them.
/// Implemented by each store over its own transaction; the drivers below are the one rule.
pub(crate) trait LeaseRows {
    /// Every lease (tombstones included) of this customer and meter; the limit stays locked
    /// against other lease operations until the transaction ends.
    fn lock_limit(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Vec<Lease>, StoreError>;
    /// Every lease (tombstones included) of these agents, locked.
    fn of_agents(&mut self, agents: &[AgentId]) -> Result<Vec<Lease>, StoreError>;
    /// Unreclaimed leases with `expires_at_ms ≤ before_ms`, locked (others' locked ones may be
    /// skipped: they are due again next tick).
    fn due(&mut self, before_ms: i64) -> Result<Vec<Lease>, StoreError>;
    /// Forgets tombstones reclaimed before `before_ms`.
    fn forget_tombstones(&mut self, before_ms: i64) -> Result<(), StoreError>;
    /// Every seq of `agent`'s `epoch` through this one is committed (the dedup watermark as
    /// this transaction sees it).
    fn watermark(&mut self, agent: AgentId, epoch: u64) -> Result<u64, StoreError>;
    /// The customer's usage of `meter` in `period`, as this transaction sees the ledger.
    fn used(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
        period: crate::core::entitlements::period::PeriodRange,
    ) -> Result<Decimal, StoreError>;
    /// How many leases are kept (tombstones may be counted).
    fn count(&mut self) -> Result<usize, StoreError>;
    /// A lease id never given before.
    fn next_id(&mut self) -> Result<u64, StoreError>;
    /// Writes the book's changes, in order.
    fn write(&mut self, changes: &[LeaseChange]) -> Result<(), StoreError>;
}

/// Sets the book's committed-through marks for every release epoch it holds.
fn load_watermarks(rows: &mut impl LeaseRows, book: &mut LeaseBook) -> Result<(), StoreError> {
    let held: BTreeSet<(AgentId, u64)> = book
        .leases()
        .chain(book.tombstones())
        .filter_map(|l| l.release.map(|(e, _)| (l.agent, e)))
        .collect();
    for (a, e) in held {
        let w = rows.watermark(a, e)?;
        book.mark_committed(a, e, w);
    }
    Ok(())
}

/// A lease request: lock the limit, load its leases, read `used` (after the lock, so usage
/// whose `shipped` is not in the loaded leases can only overstate what is taken), grant.
pub(crate) fn request_in(
    rows: &mut impl LeaseRows,
    agent: AgentId,
    req: &LeaseRequest,
    limit: Decimal,
    period: crate::core::entitlements::period::PeriodRange,
    limits: LeaseBookLimits,
    now_ms: i64,
) -> Result<(LeaseGrant, LeaseCounters), StoreError> {
    let leases = rows.lock_limit(&req.customer, &req.meter)?;
    let here = leases.len();
    let others = rows.count()?.saturating_sub(here);
    let used = rows.used(&req.customer, &req.meter, period)?;
    let next_id = rows.next_id()?;
    let mut book = LeaseBook::restore_part(limits, leases, others, next_id);
    let grant = book.request(
        now_ms,
        agent,
        req,
        LimitInput {
            limit,
            used,
            period,
        },
    );
    rows.write(&book.take_changes())?;
    Ok((grant, book.counters().clone()))
}

/// A release: load the agent's leases and the watermarks of their epochs, release, settle.
pub(crate) fn release_in(
    rows: &mut impl LeaseRows,
    agent: AgentId,
    rel: &LeaseRelease,
    limits: LeaseBookLimits,
) -> Result<LeaseCounters, StoreError> {
    let leases = rows.of_agents(&[agent])?;
    if leases.is_empty() {
        return Ok(LeaseCounters::default());
    }
    let mut book = LeaseBook::restore_part(limits, leases, 0, 1);
    load_watermarks(rows, &mut book)?;
    let w = rows.watermark(agent, rel.epoch)?;
    book.mark_committed(agent, rel.epoch, w);
    book.release(agent, rel);
    rows.write(&book.take_changes())?;
    Ok(book.counters().clone())
}

/// The tick: reclaim every lease past expiry + grace; forget old tombstones.
pub(crate) fn tick_in(
    rows: &mut impl LeaseRows,
    now_ms: i64,
    limits: LeaseBookLimits,
) -> Result<LeaseCounters, StoreError> {
    rows.forget_tombstones(now_ms.saturating_sub(TOMBSTONE_KEEP_MS))?;
    let due = rows.due(now_ms.saturating_sub(limits.grace_ms))?;
    if due.is_empty() {
        return Ok(LeaseCounters::default());
    }
    let mut book = LeaseBook::restore_part(limits, due, 0, 1);
    book.tick(now_ms);
    rows.write(&book.take_changes())?;
    Ok(book.counters().clone())
}

/// In an ingest transaction, after `ingest_group`: books the usage of the group's committed
/// batches on their agents' leases and settles releases the group completed. Returns the
/// overshoot booked (usage of reclaimed leases). Costs one lookup when no agent of the group
/// holds a lease.
pub(crate) fn ship_in(
    rows: &mut impl LeaseRows,
    catalog: &tally_protocol::catalog::Catalog,
    batches: &[super::IngestBatch],
    outcomes: &[super::IngestOutcome],
) -> Result<Decimal, StoreError> {
    use tally_protocol::frame::AckOutcome;
    let mut agents: Vec<AgentId> = batches.iter().map(|b| b.body.agent_id).collect();
    agents.sort_unstable();
    agents.dedup();
    let leases = rows.of_agents(&agents)?;
    if leases.is_empty() {
        return Ok(Decimal::ZERO);
    }
    let mut book = LeaseBook::restore_part(LeaseBookLimits::default(), leases, 0, 1);
    for (b, o) in batches.iter().zip(outcomes) {
        if *o == super::IngestOutcome::Ack(AckOutcome::Committed) {
            let usage = batch_usage(catalog, &b.body);
            book.ship_batch(b.body.agent_id, b.body.epoch, b.body.seq, &usage);
        }
    }
    load_watermarks(rows, &mut book)?;
    for a in agents {
        book.settle_agent(a);
    }
    rows.write(&book.take_changes())?;
    Ok(book.counters().overshoot)
}

/// A customer's usage of `meter` in `period`, for every store the same way: the usage accounts of
/// a calendar month, or else (an anchor-day period) the customer's transfers by event time, a scan
/// of its ledger entries (decision 0063). Grants are not usage.
pub(crate) fn used_in_period(
    store: &(impl super::Store + ?Sized),
    customer: &CustomerId,
    meter: &MeterName,
    period: PeriodRange,
) -> Result<Decimal, StoreError> {
    used_with(
        customer,
        meter,
        period,
        |c, m, p| store.usage_accounts(c, Some(m), Some(p)),
        |c, after, n| store.entries(Some(c), after, n),
    )
}

/// [`used_in_period`] over a store's reads given as functions (a transaction's, for a lease
/// request): `accounts(customer, meter, month)` and `entries(customer, after, limit)`.
pub(crate) fn used_with(
    customer: &CustomerId,
    meter: &MeterName,
    period: PeriodRange,
    mut accounts: impl FnMut(
        &CustomerId,
        &MeterName,
        crate::core::ledger::Period,
    ) -> Result<Vec<crate::core::ledger::Account>, StoreError>,
    mut entries: impl FnMut(
        &CustomerId,
        u64,
        usize,
    ) -> Result<Vec<(u64, crate::core::ledger::Transfer)>, StoreError>,
) -> Result<Decimal, StoreError> {
    use crate::core::ledger::{self, AccountKey, TransferSource, source_account_id};
    if crate::core::entitlements::period::calendar_month(period.start_ms) == period {
        let accounts = accounts(customer, meter, ledger::Period::of_ms(period.start_ms))?;
        return Ok(accounts.iter().map(ledger::Account::balance).sum());
    }
    let up = [
        source_account_id(meter),
        AccountKey::Adjustments {
            meter: meter.clone(),
        }
        .id(),
    ];
    let mut total = Decimal::ZERO;
    let mut after = 0;
    loop {
        let page = entries(customer, after, 10_000)?;
        let Some((last, _)) = page.last() else {
            break;
        };
        after = *last;
        for (_, t) in page {
            if t.unit != *meter
                || matches!(t.source, TransferSource::Grant { .. })
                || !period.contains(t.event_at_ms)
            {
                continue;
            }
            if up.contains(&t.debit) {
                total += t.amount;
            } else {
                total -= t.amount;
            }
        }
    }
    Ok(total)
}

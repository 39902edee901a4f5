//! The storage boundary of entitlements: plans, customers' entitlement settings, grants (each a
//! ledger transfer) and leases, behind one small trait beside [`super::Store`], so another
//! backend (PostgreSQL) can implement it on its own.
//!
//! Guarantees every implementation gives:
//! - [`EntitlementStore::grant`] records the grant and posts its ledger transfer
//!   (`GrantSource{meter}` → `Grants{customer, meter}`, id from the idempotency key) in one
//!   atomic, durable transaction; a repeated key with the same request returns the stored grant
//!   and writes nothing; with a different request it is refused, naming the field.
//! - Lease changes are applied in order, all or nothing.

use super::StoreError;
use crate::core::entitlements::lease::{Lease, LeaseChange};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ledger::Rejection;
use rust_decimal::Decimal;
use tally_protocol::names::{CustomerId, MeterName, PlanName};

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
    /// Every lease kept (to restore the lease book at start).
    fn leases(&self) -> Result<Vec<Lease>, StoreError>;
    /// Applies lease changes in order, in one transaction.
    fn apply_lease_changes(&self, changes: &[LeaseChange]) -> Result<(), StoreError>;
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
    use crate::core::ledger::{self, AccountKey, TransferSource, source_account_id};
    if crate::core::entitlements::period::calendar_month(period.start_ms) == period {
        let accounts = store.usage_accounts(
            customer,
            Some(meter),
            Some(ledger::Period::of_ms(period.start_ms)),
        )?;
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
        let page = store.entries(Some(customer), after, 10_000)?;
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

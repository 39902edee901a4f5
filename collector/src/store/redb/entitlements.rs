//! Entitlement tables of the redb store ([`EntitlementStore`] on [`RedbStore`]). Values are
//! JSON: these records are small and written rarely, and JSON lets fields be added without a
//! format change.
//!
//! | table                | key                          | value                         |
//! |----------------------|------------------------------|-------------------------------|
//! | `plans`              | plan name                    | `Plan`                        |
//! | `ent_customers`      | customer                     | `CustomerSettings`            |
//! | `grants`             | idempotency key              | `Grant` (with its position)   |
//! | `grants_by_customer` | (customer, idempotency key)  | `()`                          |
//! | `leases`             | lease id                     | `Lease`                       |
//!
//! A grant's transfer is appended to `transfers` in the transaction that records it, so
//! `ledger verify` traces it to `grants[key].position`.

use super::{Ledger, RedbStore, read_catalog};
use crate::core::entitlements::lease::{Lease, LeaseChange};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ledger::{self, Rejection, WorkingSet};
use crate::store::StoreError;
use crate::store::entitlements::{EntitlementStore, GrantOutcome, MAX_GRANTS_PER_CUSTOMER};
use redb::{ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_protocol::error::ErrorCode;
use tally_protocol::names::{CustomerId, MeterName, PlanName};

pub(crate) const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");
pub(crate) const ENT_CUSTOMERS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("ent_customers");
pub(crate) const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
pub(crate) const GRANTS_BY_CUSTOMER: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("grants_by_customer");
pub(crate) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");

/// Creates the entitlement tables that do not exist yet.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PLANS)?;
    txn.open_table(ENT_CUSTOMERS)?;
    txn.open_table(GRANTS)?;
    txn.open_table(GRANTS_BY_CUSTOMER)?;
    txn.open_table(LEASES)?;
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Invariant(format!("encode: {e}")))
}

pub(crate) fn unjson<T: DeserializeOwned>(
    table: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

impl EntitlementStore for RedbStore {
    fn plan(&self, name: &PlanName) -> Result<Option<Plan>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(PLANS)?;
        match t.get(name.as_str())? {
            Some(v) => Ok(Some(unjson("plans", v.value())?)),
            None => Ok(None),
        }
    }

    fn put_plan(&self, name: &PlanName, plan: &Plan) -> Result<(), StoreError> {
        let txn = self.db().begin_write()?;
        txn.open_table(PLANS)?
            .insert(name.as_str(), json(plan)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn settings(&self, customer: &CustomerId) -> Result<CustomerSettings, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(ENT_CUSTOMERS)?;
        match t.get(customer.as_str())? {
            Some(v) => unjson("ent_customers", v.value()),
            None => Ok(CustomerSettings::default()),
        }
    }

    fn put_settings(&self, customer: &CustomerId, s: &CustomerSettings) -> Result<(), StoreError> {
        let txn = self.db().begin_write()?;
        txn.open_table(ENT_CUSTOMERS)?
            .insert(customer.as_str(), json(s)?.as_slice())?;
        txn.commit()?;
        Ok(())
    }

    fn grant(&self, req: &GrantRequest, now_ms: i64) -> Result<GrantOutcome, StoreError> {
        let txn = self.db().begin_write()?;
        let outcome = {
            let mut grants = txn.open_table(GRANTS)?;
            if let Some(v) = grants.get(req.idempotency_key.as_str())? {
                let stored: Grant = unjson("grants", v.value())?;
                return Ok(match stored.request.differs_from(req) {
                    None => GrantOutcome::Exists(stored),
                    Some(f) => GrantOutcome::ExistsWithDifferent(f),
                });
            }
            let catalog = read_catalog(&txn.open_table(super::tables::META)?)?;
            if catalog.meter(req.meter.as_str()).is_none() {
                let msg = format!("meter {} is not in the catalog", req.meter);
                return Ok(GrantOutcome::Rejected(Rejection {
                    code: ErrorCode::UnknownMeter,
                    row: None,
                    message: msg,
                }));
            }
            let mut by_customer = txn.open_table(GRANTS_BY_CUSTOMER)?;
            let c = req.customer.as_str();
            let n = by_customer
                .range((c, "")..=(c, super::AFTER_ASCII))?
                .count();
            if n >= MAX_GRANTS_PER_CUSTOMER {
                return Ok(GrantOutcome::Rejected(Rejection {
                    code: ErrorCode::Overloaded,
                    row: None,
                    message: format!("a customer has at most {MAX_GRANTS_PER_CUSTOMER} grants"),
                }));
            }
            let mut ledger_t = Ledger::open(&txn)?;
            let mut ws = WorkingSet::new();
            let posting = match ledger::post_grant(
                &mut ws,
                &mut ledger_t,
                &req.customer,
                &req.meter,
                req.quantity,
                &req.idempotency_key,
                now_ms,
            )? {
                Ok(p) => p,
                Err(r) => return Ok(GrantOutcome::Rejected(r)),
            };
            let Some(t) = posting.transfers.first() else {
                return Err(StoreError::Invariant(String::from("empty grant posting")));
            };
            let position = ledger_t.append(&posting)?;
            ws.assert_balanced();
            ledger_t.put_accounts(&ws)?;
            let g = Grant {
                request: req.clone(),
                transfer_id: t.id,
                position,
                created_at_ms: now_ms,
            };
            grants.insert(req.idempotency_key.as_str(), json(&g)?.as_slice())?;
            by_customer.insert((c, req.idempotency_key.as_str()), ())?;
            GrantOutcome::Created(g)
        };
        txn.commit()?;
        Ok(outcome)
    }

    fn grants(&self, customer: &CustomerId) -> Result<Vec<Grant>, StoreError> {
        let txn = self.db().begin_read()?;
        let idx = txn.open_table(GRANTS_BY_CUSTOMER)?;
        let grants = txn.open_table(GRANTS)?;
        let c = customer.as_str();
        let mut out = Vec::new();
        for row in idx.range((c, "")..=(c, super::AFTER_ASCII))? {
            let (k, _) = row?;
            let (kc, key) = k.value();
            if kc != c {
                continue;
            }
            let Some(v) = grants.get(key)? else {
                return Err(StoreError::Invariant(format!(
                    "indexed grant {key} missing"
                )));
            };
            out.push(unjson("grants", v.value())?);
        }
        Ok(out)
    }

    fn used(
        &self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        crate::store::entitlements::used_in_period(self, customer, meter, period)
    }

    fn customers_for_stripe(&self, stripe_customer: &str) -> Result<Vec<CustomerId>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(super::tables::CUSTOMERS)?;
        let mut out: Vec<CustomerId> = CustomerId::new(stripe_customer).into_iter().collect();
        // A scan of the customers table: webhooks are rare and the table holds settings only.
        for row in t.iter()? {
            let (k, v) = row?;
            let rec: crate::store::CustomerRecord =
                postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                    table: "customers",
                    detail: e.to_string(),
                })?;
            if rec.stripe_customer_id.as_deref() == Some(stripe_customer)
                && let Ok(c) = CustomerId::new(k.value())
                && !out.contains(&c)
            {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn leases(&self) -> Result<Vec<Lease>, StoreError> {
        let txn = self.db().begin_read()?;
        let t = txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let (_, v) = row?;
            out.push(unjson("leases", v.value())?);
        }
        Ok(out)
    }

    fn apply_lease_changes(&self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let txn = self.db().begin_write()?;
        {
            let mut t = txn.open_table(LEASES)?;
            for c in changes {
                match c {
                    LeaseChange::Put(l) => {
                        t.insert(l.id, json(l)?.as_slice())?;
                    }
                    LeaseChange::Delete(id) => {
                        t.remove(*id)?;
                    }
                }
            }
        }
        txn.commit()?;
        Ok(())
    }
}

/// Traces a grant transfer at `pos` to its record (for `ledger verify`).
pub(crate) fn trace_grant(
    grants: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
    pos: u64,
) -> Result<Result<(), String>, StoreError> {
    Ok(match grants.get(key)? {
        Some(v) => {
            let g: Grant = unjson("grants", v.value())?;
            if g.position == pos {
                Ok(())
            } else {
                Err(String::from("grant key names another transfer"))
            }
        }
        None => Err(String::from("grant key is not recorded")),
    })
}

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
//! | `leases`             | lease id                     | `Lease` (tombstones too)      |
//! | `leases_by_limit`    | (customer, meter, lease id)  | `()`                          |
//! | `leases_by_agent`    | (agent, lease id)            | `()`                          |
//!
//! Lease operations run in one write transaction each (redb's writer is exclusive, so the
//! limit is "locked" by the transaction itself); ids come from `meta["lease_next_id"]`.
//!
//! A grant's transfer is appended to `transfers` in the transaction that records it, so
//! `ledger verify` traces it to `grants[key].position`.

use super::{Ledger, RedbStore, read_catalog};
use crate::core::entitlements::lease::{Lease, LeaseBookLimits, LeaseChange, LeaseCounters};
use crate::core::entitlements::period::PeriodRange;
use crate::core::entitlements::{CustomerSettings, Grant, GrantRequest, Plan};
use crate::core::ledger::{self, Rejection, WorkingSet};
use crate::store::StoreError;
use crate::store::entitlements::{
    EntitlementStore, GrantOutcome, LeaseRows, MAX_GRANTS_PER_CUSTOMER, release_in, request_in,
    tick_in,
};
use redb::{
    ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use rust_decimal::Decimal;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tally_protocol::entitlements::{LeaseGrant, LeaseRelease, LeaseRequest};
use tally_protocol::error::ErrorCode;
use tally_protocol::names::{CustomerId, MeterName, PlanName};

pub(crate) const PLANS: TableDefinition<&str, &[u8]> = TableDefinition::new("plans");
pub(crate) const ENT_CUSTOMERS: TableDefinition<&str, &[u8]> =
    TableDefinition::new("ent_customers");
pub(crate) const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");
pub(crate) const GRANTS_BY_CUSTOMER: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("grants_by_customer");
pub(crate) const LEASES: TableDefinition<u64, &[u8]> = TableDefinition::new("leases");
pub(crate) const LEASES_BY_LIMIT: TableDefinition<(&str, &str, u64), ()> =
    TableDefinition::new("leases_by_limit");
pub(crate) const LEASES_BY_AGENT: TableDefinition<(u128, u64), ()> =
    TableDefinition::new("leases_by_agent");
const LEASE_NEXT_ID: &str = "lease_next_id";

/// Creates the entitlement tables that do not exist yet.
pub(crate) fn create_all(txn: &WriteTransaction) -> Result<(), StoreError> {
    txn.open_table(PLANS)?;
    txn.open_table(ENT_CUSTOMERS)?;
    txn.open_table(GRANTS)?;
    txn.open_table(GRANTS_BY_CUSTOMER)?;
    let leases = txn.open_table(LEASES)?;
    let mut by_limit = txn.open_table(LEASES_BY_LIMIT)?;
    let mut by_agent = txn.open_table(LEASES_BY_AGENT)?;
    // Leases kept by a build without the indexes: index them once.
    if by_agent.is_empty()? && !leases.is_empty()? {
        for row in leases.iter()? {
            let (_, v) = row?;
            let l: Lease = unjson("leases", v.value())?;
            by_limit.insert((l.customer.as_str(), l.meter.as_str(), l.id), ())?;
            by_agent.insert((agent_key(l.agent), l.id), ())?;
        }
    }
    Ok(())
}

fn agent_key(a: tally_protocol::batch::AgentId) -> u128 {
    u128::from_be_bytes(a.0)
}

/// The lease rows of one redb write transaction (see [`LeaseRows`]).
pub(crate) struct RedbLeases<'t> {
    pub(crate) txn: &'t WriteTransaction,
    pub(crate) store: &'t RedbStore,
}

impl RedbLeases<'_> {
    fn load(&self, ids: impl IntoIterator<Item = u64>) -> Result<Vec<Lease>, StoreError> {
        let t = self.txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for id in ids {
            if let Some(v) = t.get(id)? {
                out.push(unjson("leases", v.value())?);
            }
        }
        Ok(out)
    }
}

impl LeaseRows for RedbLeases<'_> {
    fn lock_limit(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
    ) -> Result<Vec<Lease>, StoreError> {
        let ids: Vec<u64> = {
            let idx = self.txn.open_table(LEASES_BY_LIMIT)?;
            let (c, m) = (customer.as_str(), meter.as_str());
            idx.range((c, m, 0)..=(c, m, u64::MAX))?
                .map(|r| r.map(|(k, _)| k.value().2))
                .collect::<Result<_, _>>()?
        };
        self.load(ids)
    }

    fn of_agents(
        &mut self,
        agents: &[tally_protocol::batch::AgentId],
    ) -> Result<Vec<Lease>, StoreError> {
        let mut ids = Vec::new();
        {
            let idx = self.txn.open_table(LEASES_BY_AGENT)?;
            for a in agents {
                let k = agent_key(*a);
                for r in idx.range((k, 0)..=(k, u64::MAX))? {
                    ids.push(r?.0.value().1);
                }
            }
        }
        ids.sort_unstable();
        self.load(ids)
    }

    fn due(&mut self, before_ms: i64) -> Result<Vec<Lease>, StoreError> {
        let t = self.txn.open_table(LEASES)?;
        let mut out = Vec::new();
        for row in t.iter()? {
            let l: Lease = unjson("leases", row?.1.value())?;
            if l.reclaimed_at_ms.is_none() && l.expires_at_ms <= before_ms {
                out.push(l);
            }
        }
        Ok(out)
    }

    fn forget_tombstones(&mut self, before_ms: i64) -> Result<(), StoreError> {
        let old: Vec<u64> = {
            let t = self.txn.open_table(LEASES)?;
            let mut old = Vec::new();
            for row in t.iter()? {
                let l: Lease = unjson("leases", row?.1.value())?;
                if l.reclaimed_at_ms.is_some_and(|r| r < before_ms) {
                    old.push(l.id);
                }
            }
            old
        };
        let del: Vec<LeaseChange> = old.into_iter().map(LeaseChange::Delete).collect();
        self.write(&del)
    }

    fn watermark(
        &mut self,
        agent: tally_protocol::batch::AgentId,
        epoch: u64,
    ) -> Result<u64, StoreError> {
        let t = self.txn.open_table(super::tables::DEDUP)?;
        Ok(match t.get((agent_key(agent), epoch))? {
            Some(v) => {
                let d: crate::core::dedup::DedupState =
                    postcard::from_bytes(v.value()).map_err(|e| StoreError::Corrupt {
                        table: "dedup",
                        detail: e.to_string(),
                    })?;
                d.watermark
            }
            None => 0,
        })
    }

    fn used(
        &mut self,
        customer: &CustomerId,
        meter: &MeterName,
        period: PeriodRange,
    ) -> Result<Decimal, StoreError> {
        // A read transaction sees the last commit; this write transaction is the only writer
        // and has written no usage.
        crate::store::entitlements::used_in_period(self.store, customer, meter, period)
    }

    fn count(&mut self) -> Result<usize, StoreError> {
        Ok(usize::try_from(self.txn.open_table(LEASES)?.len()?).unwrap_or(usize::MAX))
    }

    fn next_id(&mut self) -> Result<u64, StoreError> {
        let mut meta = self.txn.open_table(super::tables::META)?;
        let mut next =
            match meta.get(LEASE_NEXT_ID)? {
                Some(v) => v.value().try_into().map(u64::from_be_bytes).map_err(|_| {
                    StoreError::Corrupt {
                        table: "meta",
                        detail: String::from("lease_next_id is not 8 bytes"),
                    }
                })?,
                None => 1,
            };
        // Above every id kept (a store written before the counter existed).
        if let Some(last) = self.txn.open_table(LEASES)?.last()? {
            next = next.max(last.0.value().saturating_add(1));
        }
        meta.insert(
            LEASE_NEXT_ID,
            next.saturating_add(1).to_be_bytes().as_slice(),
        )?;
        Ok(next)
    }

    fn write(&mut self, changes: &[LeaseChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut t = self.txn.open_table(LEASES)?;
        let mut by_limit = self.txn.open_table(LEASES_BY_LIMIT)?;
        let mut by_agent = self.txn.open_table(LEASES_BY_AGENT)?;
        for c in changes {
            match c {
                LeaseChange::Put(l) => {
                    t.insert(l.id, json(l)?.as_slice())?;
                    by_limit.insert((l.customer.as_str(), l.meter.as_str(), l.id), ())?;
                    by_agent.insert((agent_key(l.agent), l.id), ())?;
                }
                LeaseChange::Delete(id) => {
                    let old = t.remove(*id)?.map(|v| v.value().to_vec());
                    if let Some(old) = old {
                        let l: Lease = unjson("leases", &old)?;
                        by_limit.remove((l.customer.as_str(), l.meter.as_str(), l.id))?;
                        by_agent.remove((agent_key(l.agent), l.id))?;
                    }
                }
            }
        }
        Ok(())
    }
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

    fn customer_leases(&self, customer: &CustomerId) -> Result<Vec<Lease>, StoreError> {
        let txn = self.db().begin_read()?;
        let idx = txn.open_table(LEASES_BY_LIMIT)?;
        let t = txn.open_table(LEASES)?;
        let c = customer.as_str();
        let mut out = Vec::new();
        for row in idx.range((c, "", 0)..=(c, super::AFTER_ASCII, u64::MAX))? {
            let (k, _) = row?;
            if let Some(v) = t.get(k.value().2)? {
                out.push(unjson("leases", v.value())?);
            }
        }
        Ok(out)
    }

    fn lease_request(
        &self,
        agent: tally_protocol::batch::AgentId,
        req: &LeaseRequest,
        limit: Decimal,
        period: PeriodRange,
        limits: LeaseBookLimits,
        now_ms: i64,
    ) -> Result<(LeaseGrant, LeaseCounters), StoreError> {
        let txn = self.db().begin_write()?;
        let out = request_in(
            &mut RedbLeases {
                txn: &txn,
                store: self,
            },
            agent,
            req,
            limit,
            period,
            limits,
            now_ms,
        )?;
        txn.commit()?;
        Ok(out)
    }

    fn lease_release(
        &self,
        agent: tally_protocol::batch::AgentId,
        rel: &LeaseRelease,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        let txn = self.db().begin_write()?;
        let out = release_in(
            &mut RedbLeases {
                txn: &txn,
                store: self,
            },
            agent,
            rel,
            limits,
        )?;
        txn.commit()?;
        Ok(out)
    }

    fn lease_tick(
        &self,
        now_ms: i64,
        limits: LeaseBookLimits,
    ) -> Result<LeaseCounters, StoreError> {
        // Nothing due and no old tombstone (the usual tick): no write transaction at all.
        let busy = self.leases()?.iter().any(|l| match l.reclaimed_at_ms {
            Some(r) => r < now_ms.saturating_sub(crate::store::entitlements::TOMBSTONE_KEEP_MS),
            None => l.expires_at_ms <= now_ms.saturating_sub(limits.grace_ms),
        });
        if !busy {
            return Ok(LeaseCounters::default());
        }
        let txn = self.db().begin_write()?;
        let out = tick_in(
            &mut RedbLeases {
                txn: &txn,
                store: self,
            },
            now_ms,
            limits,
        )?;
        txn.commit()?;
        Ok(out)
    }

    fn ingest_overshoot(&self) -> Decimal {
        self.lease_overshoot()
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

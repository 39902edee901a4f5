//! The lease book: the collector's side of the lease rules in `tally_protocol::entitlements`,
//! as a pure state machine driven with `now_ms`.
//!
//! Per lease it keeps `granted` (the running total), `shipped` (usage of its customer and meter
//! committed from its agent's batches since it began) and its expiry. The outstanding part is
//! `max(0, granted − shipped)`, and for every customer, meter and period the book keeps
//! Σ outstanding. A grant is sized by what the agent asks (its recent rate), by what remains,
//! and, when other agents hold leases on the same limit, by half of what remains, so one busy
//! agent cannot starve the others; then `used + Σ outstanding ≤ limit` is asserted.
//!
//! `used` comes from the ledger and `shipped` from committed batches. The caller must read
//! `used` while it holds the book exclusively and report batches only after their commit, so a
//! batch is never counted in `shipped` without being in `used` (the other way round only
//! overstates what is outstanding, which is safe).
//!
//! A release is held until the agent's batches through `through_seq` are committed, then its
//! outstanding part is freed. A lease neither released nor settled by `expires_at + grace` is
//! reclaimed; usage that arrives for it later is booked and counted as overshoot.

use super::period::PeriodRange;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use tally_protocol::batch::AgentId;
use tally_protocol::entitlements::{LeaseGrant, LeaseRelease, LeaseRequest};
use tally_protocol::names::{CustomerId, MeterName};

/// The book's limits and timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseBookLimits {
    /// Most leases kept (open or held); past it requests are granted nothing.
    pub max_leases: usize,
    /// How long a grant lasts (capped at the period's end), ms.
    pub ttl_ms: i64,
    /// How long after `expires_at` an unreleased lease is kept before it is reclaimed, ms.
    pub grace_ms: i64,
    /// Most agent epochs whose ack progress is remembered.
    pub max_epochs: usize,
    /// Most reclaimed leases remembered for overshoot accounting.
    pub max_reclaimed: usize,
}

impl Default for LeaseBookLimits {
    fn default() -> Self {
        LeaseBookLimits {
            max_leases: 100_000,
            ttl_ms: 60_000,
            grace_ms: 60_000,
            max_epochs: 100_000,
            max_reclaimed: 100_000,
        }
    }
}

/// What the ledger and the entitlements say about a limit when a request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitInput {
    /// `included + granted`.
    pub limit: Decimal,
    /// Used in the period, read while the book is held.
    pub used: Decimal,
    /// The period now.
    pub period: PeriodRange,
}

/// Running counts for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseCounters {
    /// Lease requests answered.
    pub requests: u64,
    /// Requests that added quantity.
    pub grants: u64,
    /// Quantity added by grants.
    pub granted: Decimal,
    /// Leases settled after their release.
    pub released: u64,
    /// Leases reclaimed after `expires_at + grace`.
    pub reclaimed: u64,
    /// Outstanding quantity freed by reclaims.
    pub reclaimed_quantity: Decimal,
    /// Usage booked for a reclaimed lease.
    pub overshoot: Decimal,
}

/// One lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Its id (never 0).
    pub id: u64,
    /// The agent holding it.
    pub agent: AgentId,
    /// The customer.
    pub customer: CustomerId,
    /// The meter.
    pub meter: MeterName,
    /// Its period's start, ms.
    pub period_start_ms: i64,
    /// Its period's end, ms.
    pub period_end_ms: i64,
    /// Running total granted.
    pub granted: Decimal,
    /// Usage committed under it.
    pub shipped: Decimal,
    /// When the agent must stop consuming under it, ms.
    pub expires_at_ms: i64,
    /// The release, once the agent sent it: `(epoch, through_seq)`.
    pub release: Option<(u64, u64)>,
    /// When it was reclaimed unreleased (a tombstone kept so that usage consumed under it that
    /// arrives later is counted as overshoot); `None` while it holds quantity.
    #[serde(default)]
    pub reclaimed_at_ms: Option<i64>,
}

impl Lease {
    /// `max(0, granted − shipped)`.
    pub fn outstanding(&self) -> Decimal {
        (self.granted - self.shipped).max(Decimal::ZERO)
    }

    fn limit_key(&self) -> LimitKey {
        (
            self.customer.clone(),
            self.meter.clone(),
            self.period_start_ms,
        )
    }

    fn holder_key(&self) -> HolderKey {
        (self.agent, self.customer.clone(), self.meter.clone())
    }
}

/// A change the shell persists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseChange {
    /// Store (insert or replace) this lease.
    Put(Lease),
    /// Forget the lease with this id.
    Delete(u64),
}

type LimitKey = (CustomerId, MeterName, i64);
type HolderKey = (AgentId, CustomerId, MeterName);

/// The lease book.
#[derive(Debug, Default)]
pub struct LeaseBook {
    limits: LeaseBookLimits,
    leases: BTreeMap<u64, Lease>,
    /// Leases of an agent, customer and meter (open or held).
    by_holder: HashMap<HolderKey, Vec<u64>>,
    /// Σ outstanding per limit and period.
    outstanding: HashMap<LimitKey, Decimal>,
    /// Highest seq acknowledged per (agent, epoch).
    acked: HashMap<(AgentId, u64), u64>,
    /// Reclaimed leases by id (their release, if it came later, is recorded on them): usage
    /// consumed under them that arrives later is overshoot.
    reclaimed: HashMap<u64, Lease>,
    next_id: u64,
    counters: LeaseCounters,
    changes: Vec<LeaseChange>,
}

impl LeaseBook {
    /// An empty book.
    pub fn new(limits: LeaseBookLimits) -> Self {
        LeaseBook {
            limits,
            next_id: 1,
            ..Self::default()
        }
    }

    /// A book holding leases kept from an earlier run (their `shipped` may be behind: that only
    /// overstates what is outstanding until they settle or are reclaimed). Reclaimed leases
    /// (tombstones) are kept for overshoot accounting.
    pub fn restore(limits: LeaseBookLimits, leases: Vec<Lease>) -> Self {
        let mut book = LeaseBook::new(limits);
        for l in leases.into_iter().take(limits.max_leases) {
            book.next_id = book.next_id.max(l.id.saturating_add(1));
            if l.reclaimed_at_ms.is_some() {
                book.reclaimed.insert(l.id, l);
            } else {
                book.insert(l);
            }
        }
        book.changes.clear();
        book
    }

    /// A book over part of the leases a store keeps: every lease an operation can touch (those
    /// of one limit, of some agents, or those due), loaded in the operation's store
    /// transaction. `others` leases exist outside it (for [`LeaseBookLimits::max_leases`]) and
    /// a new lease gets `next_id` (the store allocates ids, so they are unique across
    /// collectors). Its changes are what the store writes back in the same transaction.
    pub fn restore_part(
        limits: LeaseBookLimits,
        leases: Vec<Lease>,
        others: usize,
        next_id: u64,
    ) -> Self {
        let mut book = LeaseBook::restore(
            LeaseBookLimits {
                max_leases: usize::MAX,
                ..limits
            },
            leases,
        );
        book.limits = LeaseBookLimits {
            max_leases: limits.max_leases.saturating_sub(others),
            ..limits
        };
        book.next_id = next_id.max(1);
        book
    }

    /// Records that every batch of `agent`'s `epoch` through `seq` is committed (the store's
    /// dedup watermark); [`LeaseBook::settle_agent`] then frees the releases that completes.
    pub fn mark_committed(&mut self, agent: AgentId, epoch: u64, seq: u64) {
        let a = self.acked.entry((agent, epoch)).or_default();
        *a = (*a).max(seq);
    }

    /// Frees `agent`'s held releases whose batches are all committed.
    pub fn settle_agent(&mut self, agent: AgentId) {
        self.settle(agent);
    }

    /// Reclaimed leases kept for overshoot accounting.
    pub fn tombstones(&self) -> impl Iterator<Item = &Lease> {
        self.reclaimed.values()
    }

    /// Books a committed batch's usage rows (as [`LeaseBook::on_batch`] does for a committed
    /// batch, without marking anything acknowledged).
    pub fn ship_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        usage: &[(CustomerId, MeterName, i64, Decimal)],
    ) {
        for (customer, meter, at_ms, qty) in usage {
            self.ship(agent, epoch, seq, customer, meter, *at_ms, *qty);
        }
    }

    /// The counters.
    pub fn counters(&self) -> &LeaseCounters {
        &self.counters
    }

    /// Every lease.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// Σ outstanding of a customer's meter in the period starting at `period_start_ms`.
    pub fn outstanding(
        &self,
        customer: &CustomerId,
        meter: &MeterName,
        period_start_ms: i64,
    ) -> Decimal {
        self.outstanding
            .get(&(customer.clone(), meter.clone(), period_start_ms))
            .copied()
            .unwrap_or_default()
    }

    /// Σ outstanding over every lease.
    pub fn outstanding_total(&self) -> Decimal {
        self.outstanding.values().copied().sum()
    }

    /// Changes to persist since the last call.
    pub fn take_changes(&mut self) -> Vec<LeaseChange> {
        std::mem::take(&mut self.changes)
    }

    fn insert(&mut self, l: Lease) {
        *self.outstanding.entry(l.limit_key()).or_default() += l.outstanding();
        self.by_holder.entry(l.holder_key()).or_default().push(l.id);
        self.changes.push(LeaseChange::Put(l.clone()));
        self.leases.insert(l.id, l);
    }

    fn remove(&mut self, id: u64) -> Option<Lease> {
        let l = self.leases.remove(&id)?;
        let key = l.limit_key();
        if let Some(o) = self.outstanding.get_mut(&key) {
            *o -= l.outstanding();
            if *o <= Decimal::ZERO {
                self.outstanding.remove(&key);
            }
        }
        let hk = l.holder_key();
        if let Some(ids) = self.by_holder.get_mut(&hk) {
            ids.retain(|i| *i != id);
            if ids.is_empty() {
                self.by_holder.remove(&hk);
            }
        }
        self.changes.push(LeaseChange::Delete(id));
        Some(l)
    }

    /// Changes a lease, keeping Σ outstanding in step.
    fn update(&mut self, id: u64, f: impl FnOnce(&mut Lease)) {
        let Some(l) = self.leases.get_mut(&id) else {
            return;
        };
        let before = l.outstanding();
        f(l);
        let after = l.outstanding();
        let key = l.limit_key();
        let o = self.outstanding.entry(key).or_default();
        *o += after - before;
        if *o <= Decimal::ZERO {
            let key = l.limit_key();
            self.outstanding.remove(&key);
        }
    }

    fn open_lease(
        &self,
        agent: AgentId,
        customer: &CustomerId,
        meter: &MeterName,
        period_start_ms: i64,
    ) -> Option<u64> {
        let ids = self
            .by_holder
            .get(&(agent, customer.clone(), meter.clone()))?;
        ids.iter().copied().find(|id| {
            self.leases
                .get(id)
                .is_some_and(|l| l.release.is_none() && l.period_start_ms == period_start_ms)
        })
    }

    /// Answers a lease request. `input` describes the limit now; the grant is in its period
    /// (which differs from the request's when the period rolled over).
    pub fn request(
        &mut self,
        now_ms: i64,
        agent: AgentId,
        req: &LeaseRequest,
        input: LimitInput,
    ) -> LeaseGrant {
        self.counters.requests += 1;
        let period = input.period;
        let key = (req.customer.clone(), req.meter.clone(), period.start_ms);
        let total = self.outstanding.get(&key).copied().unwrap_or_default();
        let existing = self.open_lease(agent, &req.customer, &req.meter, period.start_ms);
        let mine = existing
            .and_then(|id| self.leases.get(&id))
            .map_or(Decimal::ZERO, Lease::outstanding);
        let available = (input.limit - input.used - total).max(Decimal::ZERO);
        let mut add = req.quantity.max(Decimal::ZERO).min(available);
        if total > mine && available > Decimal::ONE {
            // Others hold part of this limit: take at most half of what is left, in the
            // request's own precision (halving 3 units gives 1, not 1.5: fractions of a unit
            // an agent that consumes whole units cannot use would be stranded at it until
            // its lease ends; decision 0095).
            let half = (available / Decimal::TWO)
                .trunc_with_scale(req.quantity.scale())
                .max(Decimal::ONE);
            add = add.min(half);
        }
        let expires_at_ms = now_ms.saturating_add(self.limits.ttl_ms).min(period.end_ms);
        let id = match existing {
            Some(id) => Some(id),
            None if add > Decimal::ZERO && self.leases.len() < self.limits.max_leases => {
                let id = self.next_id;
                self.next_id += 1;
                self.insert(Lease {
                    id,
                    agent,
                    customer: req.customer.clone(),
                    meter: req.meter.clone(),
                    period_start_ms: period.start_ms,
                    period_end_ms: period.end_ms,
                    granted: Decimal::ZERO,
                    shipped: Decimal::ZERO,
                    expires_at_ms,
                    release: None,
                    reclaimed_at_ms: None,
                });
                Some(id)
            }
            None => None,
        };
        let Some(id) = id else {
            return LeaseGrant {
                request_id: req.request_id,
                customer: req.customer.clone(),
                meter: req.meter.clone(),
                lease_id: 0,
                period_start_ms: period.start_ms,
                granted_total: Decimal::ZERO,
                added: Decimal::ZERO,
                expires_at_ms: now_ms,
            };
        };
        self.update(id, |l| {
            l.granted += add;
            l.expires_at_ms = expires_at_ms;
        });
        let granted_total = self.leases.get(&id).map_or(Decimal::ZERO, |l| l.granted);
        if let Some(l) = self.leases.get(&id) {
            self.changes.push(LeaseChange::Put(l.clone()));
        }
        if add > Decimal::ZERO {
            self.counters.grants += 1;
            self.counters.granted += add;
            let after = self.outstanding.get(&key).copied().unwrap_or_default();
            assert!(
                input.used + after <= input.limit,
                "lease grant broke used + outstanding <= limit: {} + {after} > {}",
                input.used,
                input.limit
            );
        }
        LeaseGrant {
            request_id: req.request_id,
            customer: req.customer.clone(),
            meter: req.meter.clone(),
            lease_id: id,
            period_start_ms: period.start_ms,
            granted_total,
            added: add,
            expires_at_ms,
        }
    }

    /// A batch of `agent` was acknowledged. When `committed` (posted now, not a duplicate),
    /// `usage` lists its `(customer, meter, bucket ms, quantity)` rows, attributed to the lease
    /// they were consumed under. Held releases this acknowledgement completes are settled.
    pub fn on_batch(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        committed: bool,
        usage: &[(CustomerId, MeterName, i64, Decimal)],
    ) {
        if committed {
            for (customer, meter, at_ms, qty) in usage {
                self.ship(agent, epoch, seq, customer, meter, *at_ms, *qty);
            }
        }
        if self.acked.len() >= self.limits.max_epochs && !self.acked.contains_key(&(agent, epoch)) {
            // Forget the lowest epoch (held releases of it settle at expiry + grace instead).
            if let Some(k) = self.acked.keys().min_by_key(|(_, e)| *e).copied() {
                self.acked.remove(&k);
            }
        }
        let a = self.acked.entry((agent, epoch)).or_default();
        *a = (*a).max(seq);
        self.settle(agent);
    }

    #[allow(clippy::too_many_arguments)]
    fn ship(
        &mut self,
        agent: AgentId,
        epoch: u64,
        seq: u64,
        customer: &CustomerId,
        meter: &MeterName,
        at_ms: i64,
        qty: Decimal,
    ) {
        let ids = self
            .by_holder
            .get(&(agent, customer.clone(), meter.clone()))
            .cloned()
            .unwrap_or_default();
        let in_period = |l: &Lease| l.period_start_ms <= at_ms && at_ms < l.period_end_ms;
        let covers = |l: &Lease| l.release.is_some_and(|(e, s)| e == epoch && seq <= s);
        // The released lease (held, or reclaimed) with the earliest release covering this
        // batch: consumption under a later lease is always in later batches.
        let through = |l: &Lease| l.release.map_or(u64::MAX, |(_, s)| s);
        let held = ids
            .iter()
            .filter_map(|id| self.leases.get(id))
            .filter(|l| in_period(l) && covers(l))
            .min_by_key(|l| through(l))
            .map(|l| (l.id, through(l)));
        let is_mine = |l: &Lease| {
            l.agent == agent && l.customer == *customer && l.meter == *meter && in_period(l)
        };
        let tomb = self
            .reclaimed
            .values()
            .filter(|l| is_mine(l) && covers(l))
            .map(through)
            .min();
        if let Some(t) = tomb
            && held.is_none_or(|(_, h)| t <= h)
        {
            self.counters.overshoot += qty;
            return;
        }
        let held = held.map(|(id, _)| id);
        let open = ids.iter().copied().find(|id| {
            self.leases
                .get(id)
                .is_some_and(|l| in_period(l) && l.release.is_none())
        });
        match held.or(open) {
            Some(id) => {
                self.update(id, |l| l.shipped += qty);
                if let Some(l) = self.leases.get(&id) {
                    self.changes.push(LeaseChange::Put(l.clone()));
                }
            }
            None => {
                if self.reclaimed.values().any(is_mine) {
                    self.counters.overshoot += qty;
                }
            }
        }
    }

    /// The agent ends a lease (see the protocol's rules). Unknown or foreign ids are ignored.
    pub fn release(&mut self, agent: AgentId, rel: &LeaseRelease) {
        let Some(l) = self.leases.get_mut(&rel.lease_id) else {
            if let Some(t) = self.reclaimed.get_mut(&rel.lease_id)
                && t.agent == agent
                && t.release.is_none()
            {
                t.release = Some((rel.epoch, rel.through_seq));
                let t = t.clone();
                self.changes.push(LeaseChange::Put(t));
            }
            return;
        };
        if l.agent != agent || l.release.is_some() {
            return;
        }
        l.release = Some((rel.epoch, rel.through_seq));
        let l = l.clone();
        self.changes.push(LeaseChange::Put(l));
        self.settle(agent);
    }

    /// Frees held releases of `agent` whose batches are all committed.
    fn settle(&mut self, agent: AgentId) {
        let done: Vec<u64> = self
            .leases
            .values()
            .filter(|l| l.agent == agent)
            .filter(|l| {
                l.release.is_some_and(|(e, s)| {
                    s == 0 || self.acked.get(&(agent, e)).is_some_and(|a| *a >= s)
                })
            })
            .map(|l| l.id)
            .collect();
        for id in done {
            if self.remove(id).is_some() {
                self.counters.released += 1;
            }
        }
    }

    /// When [`LeaseBook::tick`] is next due.
    pub fn poll_timeout(&self) -> Option<i64> {
        self.leases
            .values()
            .map(|l| l.expires_at_ms.saturating_add(self.limits.grace_ms))
            .min()
    }

    /// Reclaims every lease past `expires_at + grace`.
    pub fn tick(&mut self, now_ms: i64) {
        let due: Vec<u64> = self
            .leases
            .values()
            .filter(|l| now_ms >= l.expires_at_ms.saturating_add(self.limits.grace_ms))
            .map(|l| l.id)
            .collect();
        for id in due {
            if let Some(mut l) = self.remove(id) {
                self.counters.reclaimed += 1;
                self.counters.reclaimed_quantity += l.outstanding();
                if self.reclaimed.len() >= self.limits.max_reclaimed
                    && let Some(oldest) = self.reclaimed.keys().min().copied()
                {
                    self.reclaimed.remove(&oldest);
                    self.changes.push(LeaseChange::Delete(oldest));
                }
                l.reclaimed_at_ms = Some(now_ms);
                // Kept (as a tombstone) by the store too, replacing the lease's row.
                self.changes.push(LeaseChange::Put(l.clone()));
                self.reclaimed.insert(l.id, l);
            }
        }
    }
}

/// The usage rows of a batch that count against limits: `(customer, meter, bucket ms,
/// quantity)` of its sum and count deltas (a `last` meter's value is not consumed quantity).
/// Deltas of meters not in the catalog are skipped (such a batch is quarantined anyway).
pub fn batch_usage(
    catalog: &tally_protocol::catalog::Catalog,
    body: &tally_protocol::batch::BatchBody,
) -> Vec<(CustomerId, MeterName, i64, Decimal)> {
    use tally_protocol::catalog::Aggregation;
    body.deltas
        .iter()
        .filter_map(|d| {
            let q = match catalog.meter(d.meter.as_str())?.aggregation {
                Aggregation::Sum => d.sum,
                Aggregation::Count => Decimal::from(d.count),
                Aggregation::Last => return None,
            };
            Some((d.customer.clone(), d.meter.clone(), d.bucket_start_ms, q))
        })
        .collect()
}

#[cfg(test)]
mod tests;

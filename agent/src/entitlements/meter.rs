//! The local accounting of one (customer, meter): a plain state machine with no clock, lock or
//! I/O — the table calls it under the slot's lock with `now_ms`.
//!
//! Hard limits consume only under a lease (see `tally_protocol::entitlements`): while
//! `consumed + reserved + qty ≤ granted_total` and the lease is open, unexpired and of the
//! snapshot's period. Before it runs out (below a low-water mark sized by the recent rate, or
//! close to its expiry) the state asks for a refill, once at a time. A lease that expires, whose
//! period ended, or that is replaced, is closed: nothing is consumed under it any more, and once
//! no durable record under it is in flight it is handed out for release.
//!
//! Soft limits are counted locally and never deny; what goes past the limit is overshoot.
//! Without a current snapshot (none yet, or stale) the meter's offline policy decides, except
//! that an open lease still decides a hard limit (the collector granted it until its expiry).
//!
//! Invariants (tested against a model in `tests`): `consumed + reserved ≤ granted_total` of the
//! open lease at every step; a lease is released only with nothing in flight under it.

use super::decision::{DecidedBy, limit_decider};
use super::policy::OfflinePolicy;
use rust_decimal::Decimal;
use tally_protocol::entitlements::{Enforcement, LeaseGrant, MeterLimit, Source};

/// A request in flight is asked again after this long without an answer.
pub const REQUEST_TIMEOUT_MS: i64 = 1_000;
/// After a grant that added nothing, no new request for this long (unless the limit changes).
pub const EXHAUSTED_BACKOFF_MS: i64 = 200;
/// A refill asks for the recent rate times this (at least what the caller needs, at least one).
pub const REFILL_HORIZON_MS: i64 = 2_000;
/// A refill is asked for when what is left would last less than this at the recent rate.
pub const LOW_WATER_MS: i64 = 500;
/// A lease in use is renewed when it expires within this.
pub const RENEW_BEFORE_MS: i64 = 2_000;

/// How current the customer's snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Confirmed by a connected collector, or recently enough.
    Current,
    /// No snapshot of this customer yet.
    NoSnapshot,
    /// Older than the configured age.
    Stale,
}

/// The limit of the period, as the snapshot gave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitView {
    /// `included + granted`.
    pub limit: Decimal,
    /// Included in the plan.
    pub included: Decimal,
    /// Active grants.
    pub granted: Decimal,
    /// Used, as the ledger knew it.
    pub used: Decimal,
    /// Hard or soft.
    pub enforcement: Enforcement,
    /// Plan or override.
    pub source: Source,
    /// Period start, ms.
    pub period_start_ms: i64,
    /// Period end (exclusive), ms.
    pub period_end_ms: i64,
}

impl From<&MeterLimit> for LimitView {
    fn from(l: &MeterLimit) -> Self {
        LimitView {
            limit: l.limit,
            included: l.included,
            granted: l.granted,
            used: l.used,
            enforcement: l.enforcement,
            source: l.source,
            period_start_ms: l.period_start_ms,
            period_end_ms: l.period_end_ms,
        }
    }
}

/// A lease this agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// The collector's id.
    pub id: u64,
    /// The period it counts in.
    pub period_start_ms: i64,
    /// Everything granted on it.
    pub granted_total: Decimal,
    /// Consumed under it (counted from its start).
    pub consumed: Decimal,
    /// When it must be released.
    pub expires_at_ms: i64,
    /// No more consumption; released once nothing is in flight.
    pub closing: bool,
}

/// Which account a take was booked on, to undo, release or commit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Booked {
    /// Under the lease of this generation.
    Lease(u64),
    /// Locally (soft limit, or no limit).
    Local,
    /// Under the offline policy.
    Offline,
    /// Nothing to undo (denied, or taken without the lock and recorded already).
    None,
}

/// Consume now, or hold for a later commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Count it as consumed.
    Consume,
    /// Hold it (a reservation).
    Reserve,
}

/// The outcome of a take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Take {
    /// Allowed (and booked).
    pub allowed: bool,
    /// What decided.
    pub decided_by: DecidedBy,
    /// Remaining after it, if there is a limit.
    pub remaining: Option<Decimal>,
    /// Where it was booked.
    pub booked: Booked,
    /// Quantity past a soft limit this take added.
    pub overshoot: Decimal,
}

/// The accounting of one (customer, meter).
#[derive(Debug, Clone)]
pub struct MeterState {
    limit: Option<LimitView>,
    policy: OfflinePolicy,
    /// Consumed here since the snapshot's `used` (shown in `limit()`, counts soft overshoot).
    local_used: Decimal,
    lease: Option<Lease>,
    /// Held by reservations under the open lease.
    reserved: Decimal,
    /// Durable records in flight under the lease.
    inflight: u32,
    /// Bumped whenever the lease changes; reservations and in-flight records remember it.
    generation: u64,
    request_since: Option<i64>,
    exhausted_until: i64,
    window_start_ms: i64,
    window_consumed: Decimal,
    /// Recent rate, units per second.
    rate: Decimal,
    /// What lasts [`LOW_WATER_MS`] at the recent rate (kept with the rate: no division per call).
    low_water: Decimal,
    offline_used: Decimal,
    overshoot: Decimal,
    /// Lent to the lock-free pool (`super::fast`): counted in the lease's `consumed`, not yet
    /// in `local_used`.
    lent: Decimal,
}

/// What calls may do without the meter's lock, as of a locked operation's end (see
/// `super::fast`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPlan {
    /// Take from the open lease's available quantity.
    Lease {
        /// What the lease still allows.
        available: Decimal,
        /// `limit − used − local` (remaining as this agent knows it).
        base: Decimal,
        /// No take at or after this (the lease's expiry or the period's end).
        until_ms: i64,
        /// A take at or after this takes the lock (renewal, a request's timeout, a backoff).
        slow_at_ms: i64,
        /// A take that leaves this or less takes the lock after (refill); `None`: never.
        low_water: Option<Decimal>,
    },
    /// Count locally (soft limit, or none), with a current snapshot.
    Local {
        /// `limit − used − local`; `None` without a limit.
        room: Option<Decimal>,
        /// `included − used − local` when a plan's limit has grants on top.
        grant_at: Option<Decimal>,
        /// What decides below `grant_at`.
        decided_by: DecidedBy,
    },
    /// Everything takes the lock.
    Slow,
}

impl MeterState {
    /// A meter with this limit (`None`: none) and offline policy.
    pub fn new(limit: Option<LimitView>, policy: OfflinePolicy) -> Self {
        MeterState {
            limit,
            policy,
            local_used: Decimal::ZERO,
            lease: None,
            reserved: Decimal::ZERO,
            inflight: 0,
            generation: 0,
            request_since: None,
            exhausted_until: i64::MIN,
            window_start_ms: i64::MIN,
            window_consumed: Decimal::ZERO,
            rate: Decimal::ZERO,
            low_water: Decimal::ZERO,
            offline_used: Decimal::ZERO,
            overshoot: Decimal::ZERO,
            lent: Decimal::ZERO,
        }
    }

    /// What calls may do without the lock now (see `super::fast`).
    pub fn fast_plan(&self, now_ms: i64) -> FastPlan {
        let Some(lim) = self.limit else {
            return FastPlan::Local {
                room: None,
                grant_at: None,
                decided_by: DecidedBy::Plan,
            };
        };
        if lim.enforcement == Enforcement::Soft {
            let room = lim.limit - lim.used - self.local_used;
            let grant_at = (lim.source == Source::Plan && lim.granted > Decimal::ZERO)
                .then(|| lim.included - lim.used - self.local_used);
            return FastPlan::Local {
                room: Some(room),
                grant_at,
                decided_by: DecidedBy::from_source(lim.source),
            };
        }
        let Some(l) = self.lease.filter(|_| self.lease_open(now_ms)) else {
            return FastPlan::Slow;
        };
        let until_ms = l.expires_at_ms.min(lim.period_end_ms);
        let pending = self.request_pending(now_ms);
        let backoff = now_ms < self.exhausted_until;
        let next = if let Some(t) = self.request_since.filter(|_| pending) {
            t.saturating_add(REQUEST_TIMEOUT_MS)
        } else if backoff {
            self.exhausted_until
        } else {
            // Possibly past already: then the next take takes the lock and asks for renewal.
            l.expires_at_ms.saturating_sub(RENEW_BEFORE_MS)
        };
        FastPlan::Lease {
            available: self.available(now_ms),
            base: lim.limit - lim.used - self.local_used,
            until_ms,
            slow_at_ms: until_ms.min(next),
            low_water: (!pending && !backoff).then_some(self.low_water),
        }
    }

    /// Lends `q` of the open lease to the lock-free pool (counted as consumed until
    /// [`MeterState::unlend`]).
    pub fn lend(&mut self, q: Decimal) {
        if let Some(l) = &mut self.lease {
            l.consumed += q;
            self.lent = q;
        }
    }

    /// The pool comes back with `unused` left: what was taken from it is consumption now.
    pub fn unlend(&mut self, unused: Decimal, now_ms: i64) {
        let taken = self.lent - unused;
        self.lent = Decimal::ZERO;
        let Some(l) = &mut self.lease else {
            return;
        };
        l.consumed -= unused;
        if taken > Decimal::ZERO {
            l.consumed -= taken;
            self.consume_under_lease(taken, now_ms);
        }
    }

    /// Folds `q` counted locally without the lock (its overshoot was counted then).
    pub fn absorb_local(&mut self, q: Decimal) {
        self.local_used += q;
    }

    /// The limit, if any.
    pub fn limit(&self) -> Option<LimitView> {
        self.limit
    }

    /// The lease, if one is held.
    pub fn lease(&self) -> Option<Lease> {
        self.lease
    }

    /// Quantity held by reservations under the lease.
    pub fn reserved(&self) -> Decimal {
        self.reserved
    }

    /// Whether a lease request is in flight (an answer may come).
    pub fn request_pending(&self, now_ms: i64) -> bool {
        self.request_since
            .is_some_and(|t| now_ms.saturating_sub(t) < REQUEST_TIMEOUT_MS)
    }

    /// Soft-limit overshoot counted here.
    pub fn overshoot(&self) -> Decimal {
        self.overshoot
    }

    /// A new snapshot of this meter: its limit (`None`: none now). Local counts restart from
    /// the snapshot's `used`; a changed limit ends an exhausted backoff.
    pub fn on_snapshot(&mut self, limit: Option<LimitView>) {
        if limit.map(|l| (l.limit, l.period_start_ms))
            != self.limit.map(|l| (l.limit, l.period_start_ms))
        {
            self.exhausted_until = i64::MIN;
        }
        self.limit = limit;
        self.local_used = Decimal::ZERO;
        self.offline_used = Decimal::ZERO;
    }

    fn lease_open(&self, now_ms: i64) -> bool {
        match (&self.lease, &self.limit) {
            (Some(l), Some(lim)) => {
                !l.closing
                    && now_ms < l.expires_at_ms
                    && l.period_start_ms == lim.period_start_ms
                    && now_ms < lim.period_end_ms
            }
            _ => false,
        }
    }

    /// What the lease still allows here (zero when none is open).
    pub fn available(&self, now_ms: i64) -> Decimal {
        match &self.lease {
            Some(l) if self.lease_open(now_ms) => {
                (l.granted_total - l.consumed - self.reserved).max(Decimal::ZERO)
            }
            _ => Decimal::ZERO,
        }
    }

    /// `limit − used − local`, at least zero.
    pub fn remaining(&self) -> Option<Decimal> {
        self.limit
            .map(|l| (l.limit - l.used - self.local_used).max(Decimal::ZERO))
    }

    /// Used as far as this agent knows.
    pub fn used(&self) -> Decimal {
        self.limit.map_or(Decimal::ZERO, |l| l.used) + self.local_used
    }

    /// The decider of a consumption now, without booking anything.
    pub fn decider(&self, fresh: Freshness, now_ms: i64) -> DecidedBy {
        match (fresh, self.limit) {
            (_, Some(l)) if l.enforcement == Enforcement::Hard && self.lease_open(now_ms) => {
                DecidedBy::Lease
            }
            (Freshness::NoSnapshot, _) => DecidedBy::NoSnapshot,
            (Freshness::Stale, _) => DecidedBy::StaleSnapshot,
            (Freshness::Current, None) => DecidedBy::Plan,
            (Freshness::Current, Some(l)) if l.enforcement == Enforcement::Hard => DecidedBy::Lease,
            (Freshness::Current, Some(l)) => {
                limit_decider(l.source, l.included, self.used(), l.granted)
            }
        }
    }

    fn offline_take(&mut self, qty: Decimal, decided_by: DecidedBy) -> Take {
        let allowed = match self.policy {
            OfflinePolicy::Deny => false,
            OfflinePolicy::Allow => true,
            OfflinePolicy::AllowUpTo(q) => self.offline_used + qty <= q,
        };
        if allowed {
            self.offline_used += qty;
        }
        Take {
            allowed,
            decided_by,
            remaining: self.remaining(),
            booked: if allowed {
                Booked::Offline
            } else {
                Booked::None
            },
            overshoot: Decimal::ZERO,
        }
    }

    fn local_add(&mut self, qty: Decimal) -> Decimal {
        self.local_used += qty;
        let Some(l) = self.limit else {
            return Decimal::ZERO;
        };
        let used = l.used + self.local_used;
        if used <= l.limit {
            return Decimal::ZERO;
        }
        // Only the part of this take that lies past the limit.
        let over = (used - l.limit).min(qty);
        self.overshoot += over;
        over
    }

    /// Consumes or holds `qty` if allowed. Does not ask for a refill: call
    /// [`MeterState::want_refill`] after.
    pub fn take(&mut self, qty: Decimal, hold: Hold, fresh: Freshness, now_ms: i64) -> Take {
        let decided_by = self.decider(fresh, now_ms);
        if decided_by == DecidedBy::Lease {
            let allowed = self.available(now_ms) >= qty && self.lease_open(now_ms);
            if allowed {
                match hold {
                    Hold::Consume => self.consume_under_lease(qty, now_ms),
                    Hold::Reserve => self.reserved += qty,
                }
            }
            return Take {
                allowed,
                decided_by,
                remaining: self.remaining(),
                booked: if allowed {
                    Booked::Lease(self.generation)
                } else {
                    Booked::None
                },
                overshoot: Decimal::ZERO,
            };
        }
        if matches!(decided_by, DecidedBy::NoSnapshot | DecidedBy::StaleSnapshot) {
            return self.offline_take(qty, decided_by);
        }
        let overshoot = self.local_add(qty);
        Take {
            allowed: true,
            decided_by,
            remaining: self.remaining(),
            booked: Booked::Local,
            overshoot,
        }
    }

    fn consume_under_lease(&mut self, qty: Decimal, now_ms: i64) {
        if let Some(l) = &mut self.lease {
            l.consumed += qty;
        }
        self.local_used += qty;
        if now_ms.saturating_sub(self.window_start_ms) > REFILL_HORIZON_MS {
            self.window_start_ms = now_ms;
            self.window_consumed = Decimal::ZERO;
        }
        self.window_consumed += qty;
    }

    /// Undoes a take whose recording failed.
    pub fn untake(&mut self, booked: Booked, qty: Decimal) {
        match booked {
            Booked::Lease(g) if g == self.generation => {
                if let Some(l) = &mut self.lease {
                    l.consumed -= qty;
                }
                self.local_used -= qty;
            }
            Booked::Lease(_) | Booked::None => {}
            Booked::Local => self.local_used -= qty,
            Booked::Offline => self.offline_used -= qty,
        }
    }

    /// Gives back what a reservation held (it was dropped).
    pub fn unhold(&mut self, booked: Booked, held: Decimal) {
        match booked {
            Booked::Lease(g) if g == self.generation => {
                self.reserved = (self.reserved - held).max(Decimal::ZERO);
            }
            Booked::Lease(_) | Booked::None => {}
            Booked::Local => self.local_used -= held,
            Booked::Offline => self.offline_used -= held,
        }
    }

    /// Turns a reservation of `held` into consumption of `actual`, capped by what the lease or
    /// the offline allowance still allows; returns what is consumed and must be recorded.
    pub fn commit(
        &mut self,
        booked: Booked,
        held: Decimal,
        actual: Decimal,
        fresh: Freshness,
        now_ms: i64,
    ) -> (Decimal, Take) {
        match booked {
            Booked::Lease(g) if g == self.generation && self.lease_open(now_ms) => {
                self.reserved = (self.reserved - held).max(Decimal::ZERO);
                let rec = actual.min(self.available(now_ms));
                self.consume_under_lease(rec, now_ms);
                let take = Take {
                    allowed: rec == actual,
                    decided_by: DecidedBy::Lease,
                    remaining: self.remaining(),
                    booked,
                    overshoot: Decimal::ZERO,
                };
                (rec, take)
            }
            Booked::Lease(_) | Booked::None => {
                // The lease the hold was under is gone: a fresh take of the whole quantity.
                let t = self.take(actual, Hold::Consume, fresh, now_ms);
                (if t.allowed { actual } else { Decimal::ZERO }, t)
            }
            Booked::Local => {
                self.local_used -= held;
                let over = self.local_add(actual);
                let take = Take {
                    allowed: true,
                    decided_by: self.decider(fresh, now_ms),
                    remaining: self.remaining(),
                    booked,
                    overshoot: over,
                };
                (actual, take)
            }
            Booked::Offline => {
                self.offline_used -= held;
                let rec = match self.policy {
                    OfflinePolicy::AllowUpTo(q) => {
                        actual.min((q - self.offline_used).max(Decimal::ZERO))
                    }
                    OfflinePolicy::Allow => actual,
                    OfflinePolicy::Deny => Decimal::ZERO,
                };
                self.offline_used += rec;
                let take = Take {
                    allowed: rec == actual,
                    decided_by: self.decider(fresh, now_ms),
                    remaining: self.remaining(),
                    booked,
                    overshoot: Decimal::ZERO,
                };
                (rec, take)
            }
        }
    }

    /// A durable record under `booked` starts (the lease is not released until it ends).
    pub fn begin_inflight(&mut self, booked: Booked) {
        if matches!(booked, Booked::Lease(g) if g == self.generation) {
            self.inflight += 1;
        }
    }

    /// A durable record ends; `ok == false` undoes its take.
    pub fn end_inflight(&mut self, booked: Booked, qty: Decimal, ok: bool) {
        if matches!(booked, Booked::Lease(g) if g == self.generation) {
            self.inflight = self.inflight.saturating_sub(1);
        }
        if !ok {
            self.untake(booked, qty);
        }
    }

    /// Whether to ask for (more of) a lease now, and how much; marks the request in flight.
    /// `need` is what the last caller wanted.
    pub fn want_refill(
        &mut self,
        need: Decimal,
        fresh: Freshness,
        now_ms: i64,
    ) -> Option<(i64, Decimal)> {
        let lim = self.limit?;
        if lim.enforcement != Enforcement::Hard || fresh != Freshness::Current {
            return None;
        }
        if self
            .request_since
            .is_some_and(|t| now_ms.saturating_sub(t) < REQUEST_TIMEOUT_MS)
            || now_ms < self.exhausted_until
            || now_ms >= lim.period_end_ms
        {
            return None;
        }
        let avail = self.available(now_ms);
        let expiring = self
            .lease
            .is_some_and(|l| l.expires_at_ms.saturating_sub(now_ms) < RENEW_BEFORE_MS);
        let short = avail < need
            || avail <= self.low_water
            || (expiring && !self.window_consumed.is_zero());
        if !short && self.lease_open(now_ms) {
            return None;
        }
        if let Some(l) = self.lease
            && l.closing
        {
            // Released first; a new lease is asked for after.
            return None;
        }
        self.update_rate(now_ms);
        let want = (self.rate * Decimal::from(REFILL_HORIZON_MS) / Decimal::from(1000))
            .max(need - avail)
            .max(Decimal::ONE)
            .round_dp_with_strategy(0, rust_decimal::RoundingStrategy::AwayFromZero);
        self.request_since = Some(now_ms);
        Some((lim.period_start_ms, want))
    }

    fn update_rate(&mut self, now_ms: i64) {
        let elapsed = now_ms.saturating_sub(self.window_start_ms);
        if (1..=REFILL_HORIZON_MS * 4).contains(&elapsed) {
            self.rate =
                self.window_consumed * Decimal::from(1000) / Decimal::from(elapsed.max(100));
        } else if elapsed > REFILL_HORIZON_MS * 4 {
            self.rate = Decimal::ZERO;
        }
        self.low_water = self.rate * Decimal::from(LOW_WATER_MS) / Decimal::from(1000);
    }

    /// A grant for a lease this agent already released (the request crossed the release):
    /// nothing of it may be consumed; the next request gets a new lease.
    pub fn on_stale_grant(&mut self) {
        self.request_since = None;
    }

    /// A grant for this meter. Returns a lease it displaced, to release.
    pub fn on_grant(&mut self, g: &LeaseGrant, now_ms: i64) -> Option<Lease> {
        self.request_since = None;
        if g.added.is_zero() {
            self.exhausted_until = now_ms.saturating_add(EXHAUSTED_BACKOFF_MS);
        }
        if g.lease_id == 0 {
            // Nothing granted and no lease opened.
            return None;
        }
        match &mut self.lease {
            Some(l) if l.id == g.lease_id && l.closing => None,
            Some(l) if l.id == g.lease_id => {
                l.granted_total = l.granted_total.max(g.granted_total);
                l.expires_at_ms = l.expires_at_ms.max(g.expires_at_ms);
                None
            }
            _ => {
                // A lease this agent does not hold (new, or one it released): only what this
                // grant added is ours to consume, whatever came before.
                let displaced = self.lease.take().map(|mut l| {
                    l.closing = true;
                    l
                });
                if displaced.is_some() && self.inflight > 0 {
                    // Cannot release it yet; keep it closing and ignore this grant (its
                    // quantity comes back when the lease expires or on the next request).
                    self.lease = displaced;
                    return None;
                }
                self.generation += 1;
                self.reserved = Decimal::ZERO;
                self.lease = Some(Lease {
                    id: g.lease_id,
                    period_start_ms: g.period_start_ms,
                    granted_total: g.granted_total,
                    consumed: (g.granted_total - g.added).max(Decimal::ZERO),
                    expires_at_ms: g.expires_at_ms,
                    closing: false,
                });
                displaced
            }
        }
    }

    /// Closes a lease that expired, whose period ended, or that `force` ends (shutdown); returns
    /// it once nothing is in flight under it, for release. Reservations under it lose their hold.
    pub fn due_release(&mut self, now_ms: i64, force: bool) -> Option<Lease> {
        let lim_period = self.limit.map(|l| (l.period_start_ms, l.period_end_ms));
        let l = self.lease.as_mut()?;
        let ended = now_ms >= l.expires_at_ms
            || lim_period.is_none_or(|(s, e)| s != l.period_start_ms || now_ms >= e);
        if !(l.closing || ended || force) {
            return None;
        }
        l.closing = true;
        if self.inflight > 0 {
            return None;
        }
        let out = self.lease.take();
        self.generation += 1;
        self.reserved = Decimal::ZERO;
        out
    }
}

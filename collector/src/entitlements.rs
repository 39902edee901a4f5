//! The entitlements handle: the one writer of plans, customers' entitlement settings and
//! grants, the owner of the lease book, and the one sender of entitlement changes to agent
//! sessions (like [`crate::catalog::Catalogs`] for the catalog).
//!
//! Every write tells subscribers which customer changed (or that every customer may have, for a
//! plan edit); time-driven changes (a grant starting or expiring, a period rolling over) are
//! queued per customer when its view is built and announced by [`Entitlements::tick`], which
//! the collector runs every 250 ms on a task of its own ([`Entitlements::spawn_ticker`]). Sessions rebuild and push the customers they track.
//!
//! The lease book's truth is the store's, shared by every collector on it (decision 0095): a
//! lease request, release or reclaim is one store transaction
//! ([`EntitlementStore::lease_request`]), and committed usage reaches its lease in the ingest
//! transaction that posts it.

use crate::core::entitlements::lease::{LeaseBookLimits, LeaseCounters};
use crate::core::entitlements::{CustomerView, GrantRequest, Plan, build_customer};
use crate::store::entitlements::{EntitlementStore, GrantOutcome};
use crate::store::{CustomerRecord, Store, StoreError};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tally_clock::SharedClock;
use tally_protocol::batch::AgentId;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::entitlements::{
    EntitlementsSnapshot, LeaseGrant, LeaseRelease, LeaseRequest, MAX_CUSTOMERS_PER_PUSH,
};
use tally_protocol::names::{CustomerId, MeterName, PlanName};
use tokio::sync::broadcast;

/// Most time-driven changes queued (past it the latest are dropped; the customer's next view
/// queues them again).
const MAX_TIMERS: usize = 1_000_000;
/// Most agents whose customers are remembered between their sessions, and most customers
/// remembered in all.
const MAX_REMEMBERED_AGENTS: usize = 10_000;
const MAX_REMEMBERED_CUSTOMERS: usize = 1_000_000;
/// Changes buffered per subscriber; a subscriber that falls behind rebuilds everything.
const CHANGE_BUFFER: usize = 4_096;

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// One customer's entitlements.
    Customer(CustomerId),
    /// Possibly every customer's (a plan edit).
    All,
}

/// Entitlement metrics (`tally_collector_entitlements_…`).
#[derive(Debug, Clone, Default)]
pub struct EntitlementMetrics {
    /// `lease_requests_total`.
    pub lease_requests: Counter,
    /// `lease_grants_total`: requests that added quantity.
    pub lease_grants: Counter,
    /// `leased_outstanding`: Σ outstanding over every lease.
    pub leased_outstanding: Gauge<f64, AtomicU64>,
    /// `lease_reclaimed_total`: leases reclaimed after expiry and grace.
    pub reclaimed: Counter,
    /// `overshoot`: usage booked for reclaimed leases (quantity, every meter).
    pub overshoot: Gauge<f64, AtomicU64>,
    /// `soft_overshoot`: usage past soft limits, Σ over the customers' views built last (each
    /// customer's latest), quantity.
    pub soft_overshoot: Gauge<f64, AtomicU64>,
    /// `pushes_total`: snapshot frames sent to agents.
    pub pushes: Counter,
}

impl EntitlementMetrics {
    /// Registers them under `tally_collector_entitlements`.
    pub fn register(root: &mut Registry) -> Self {
        let m = EntitlementMetrics::default();
        let r = root.sub_registry_with_prefix("tally_collector_entitlements");
        r.register(
            "lease_requests",
            "Lease requests answered",
            m.lease_requests.clone(),
        );
        r.register(
            "lease_grants",
            "Lease requests that added quantity",
            m.lease_grants.clone(),
        );
        r.register(
            "leased_outstanding",
            "Quantity held by leases and not yet used",
            m.leased_outstanding.clone(),
        );
        r.register(
            "lease_reclaimed",
            "Leases reclaimed unreleased",
            m.reclaimed.clone(),
        );
        r.register(
            "overshoot",
            "Usage booked for reclaimed leases, past hard limits",
            m.overshoot.clone(),
        );
        r.register(
            "soft_overshoot",
            "Usage past soft limits in the current periods of the customers viewed",
            m.soft_overshoot.clone(),
        );
        r.register(
            "pushes",
            "Entitlement snapshot frames sent",
            m.pushes.clone(),
        );
        m
    }
}

/// The entitlements handle.
pub struct Entitlements {
    store: Arc<dyn EntitlementStore>,
    ledger: Arc<dyn Store>,
    clock: SharedClock,
    limits: LeaseBookLimits,
    /// Lease counters of this process's operations (reclaims, overshoot), for metrics.
    counters: Mutex<LeaseCounters>,
    /// Each customer's usage past its soft limits, as its view last showed (bounded).
    soft_over: Mutex<HashMap<CustomerId, Decimal>>,
    ticks: AtomicU64,
    tx: broadcast::Sender<Change>,
    version: AtomicU64,
    timers: Mutex<BTreeSet<(i64, CustomerId)>>,
    /// Customers each agent's sessions tracked, pushed again when it reconnects.
    remembered: Mutex<Remembered>,
    metrics: EntitlementMetrics,
}

#[derive(Default)]
struct Remembered {
    by_agent: std::collections::HashMap<AgentId, std::collections::HashSet<CustomerId>>,
    total: usize,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Entitlements {
    /// A handle over `store` (entitlements and leases) and `ledger` (customers' plans).
    pub fn open(
        store: Arc<dyn EntitlementStore>,
        ledger: Arc<dyn Store>,
        clock: SharedClock,
        limits: LeaseBookLimits,
        metrics: EntitlementMetrics,
    ) -> Result<Self, StoreError> {
        let (tx, _) = broadcast::channel(CHANGE_BUFFER);
        let e = Entitlements {
            store,
            ledger,
            clock,
            limits,
            counters: Mutex::new(LeaseCounters::default()),
            soft_over: Mutex::new(HashMap::new()),
            ticks: AtomicU64::new(0),
            tx,
            version: AtomicU64::new(0),
            timers: Mutex::new(BTreeSet::new()),
            remembered: Mutex::new(Remembered::default()),
            metrics,
        };
        e.refresh_outstanding()?;
        Ok(e)
    }

    /// A receiver of every later change.
    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// The metrics.
    pub fn metrics(&self) -> &EntitlementMetrics {
        &self.metrics
    }

    /// Tells every session of a change made elsewhere (another collector on the same
    /// PostgreSQL).
    pub fn announce(&self, c: Change) {
        self.notify(c);
    }

    fn notify(&self, c: Change) {
        // No subscriber is not an error: nothing to tell.
        let _ = self.tx.send(c);
    }

    /// A version above every earlier one, also across restarts (ms × 1000 at least).
    pub fn next_version(&self) -> u64 {
        let floor = u64::try_from(self.clock.now_ms())
            .unwrap_or(0)
            .saturating_mul(1000);
        let mut cur = self.version.load(Ordering::Relaxed);
        loop {
            let next = cur.saturating_add(1).max(floor);
            match self
                .version
                .compare_exchange(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(v) => cur = v,
            }
        }
    }

    /// Remembers customers an agent's session started tracking (bounded: past the limits,
    /// new ones are not remembered and the agent asks again after a reconnect).
    pub fn remember(&self, agent: AgentId, customers: &[CustomerId]) {
        let mut r = relock(&self.remembered);
        if !r.by_agent.contains_key(&agent) && r.by_agent.len() >= MAX_REMEMBERED_AGENTS {
            return;
        }
        let mut room = MAX_REMEMBERED_CUSTOMERS.saturating_sub(r.total);
        let mine = r.by_agent.entry(agent).or_default();
        let mut added = 0;
        for c in customers {
            if room == 0 {
                break;
            }
            if mine.insert(c.clone()) {
                added += 1;
                room -= 1;
            }
        }
        r.total += added;
    }

    /// Customers remembered for `agent` (pushed when it connects).
    pub fn remembered(&self, agent: AgentId) -> Vec<CustomerId> {
        relock(&self.remembered)
            .by_agent
            .get(&agent)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The plan with this name.
    pub fn plan(&self, name: &PlanName) -> Result<Option<Plan>, StoreError> {
        self.store.plan(name)
    }

    /// Adds or replaces a plan (checked by the caller) and tells every session.
    pub fn put_plan(&self, name: &PlanName, plan: &Plan) -> Result<(), StoreError> {
        self.store.put_plan(name, plan)?;
        self.notify(Change::All);
        Ok(())
    }

    /// A customer's entitlement settings.
    pub fn settings(
        &self,
        customer: &CustomerId,
    ) -> Result<crate::core::entitlements::CustomerSettings, StoreError> {
        self.store.settings(customer)
    }

    /// Stores a customer's record and entitlement settings (the caller checked that its plan
    /// exists: plans are never deleted) and tells sessions.
    pub fn put_customer(
        &self,
        customer: &CustomerId,
        rec: &CustomerRecord,
        settings: Option<&crate::core::entitlements::CustomerSettings>,
    ) -> Result<(), StoreError> {
        if let Some(s) = settings {
            self.store.put_settings(customer, s)?;
        }
        self.ledger.put_customer(customer.as_str(), rec)?;
        self.notify(Change::Customer(customer.clone()));
        Ok(())
    }

    /// Replaces the customer's Stripe features (a webhook or a fetch) and tells sessions.
    pub fn set_stripe_features(
        &self,
        customer: &CustomerId,
        features: std::collections::BTreeSet<tally_protocol::names::FeatureName>,
    ) -> Result<(), StoreError> {
        let mut s = self.store.settings(customer)?;
        if s.stripe_features != features {
            s.stripe_features = features;
            self.store.put_settings(customer, &s)?;
            self.notify(Change::Customer(customer.clone()));
        }
        Ok(())
    }

    /// Applies a verified Stripe event: a summary update sets the features of every customer
    /// mapped to its Stripe customer. Returns how many customers changed hands on it.
    pub fn apply_stripe_event(&self, event: &serde_json::Value) -> Result<usize, StoreError> {
        let Some((stripe, features)) = crate::core::entitlements::stripe::summary_update(event)
        else {
            return Ok(0);
        };
        let customers = self.store.customers_for_stripe(&stripe)?;
        for c in &customers {
            self.set_stripe_features(c, features.clone())?;
        }
        Ok(customers.len())
    }

    /// Like [`Entitlements::grant`], for a request whose `effective_at` was omitted (and so
    /// set to now): a retry takes the first request's time, so it matches instead of being
    /// refused as different.
    pub fn grant_from_now(&self, mut req: GrantRequest) -> Result<GrantOutcome, StoreError> {
        if let Some(first) = self
            .store
            .grants(&req.customer)?
            .into_iter()
            .find(|g| g.request.idempotency_key == req.idempotency_key)
        {
            req.effective_at_ms = first.request.effective_at_ms;
        }
        self.grant(&req)
    }

    /// Records a grant (checked by the caller) and tells sessions when it is new.
    pub fn grant(&self, req: &GrantRequest) -> Result<GrantOutcome, StoreError> {
        let out = self.store.grant(req, self.clock.now_ms())?;
        if matches!(out, GrantOutcome::Created(_)) {
            self.notify(Change::Customer(req.customer.clone()));
        }
        Ok(out)
    }

    /// A customer's entitlements now, with what leases hold.
    pub fn view(&self, customer: &CustomerId) -> Result<CustomerView, StoreError> {
        let now = self.clock.now_ms();
        let rec = self.ledger.customer(customer.as_str())?.unwrap_or_default();
        let plan_name = rec.plan.as_deref().and_then(|p| PlanName::new(p).ok());
        let plan = match &plan_name {
            Some(p) => self.store.plan(p)?,
            None => None,
        };
        let settings = self.store.settings(customer)?;
        let grants = self.store.grants(customer)?;
        // What leases hold, per meter and period (tombstones hold nothing).
        let mut leased: HashMap<(MeterName, i64), Decimal> = HashMap::new();
        for l in self.store.customer_leases(customer)? {
            if l.reclaimed_at_ms.is_none() {
                *leased
                    .entry((l.meter.clone(), l.period_start_ms))
                    .or_default() += l.outstanding();
            }
        }
        let mut err = None;
        let view = build_customer(
            customer,
            plan_name.as_ref(),
            plan.as_ref(),
            &settings,
            &grants,
            now,
            |m, p| match self.store.used(customer, m, p) {
                Ok(u) => u,
                Err(e) => {
                    err = Some(e);
                    Decimal::ZERO
                }
            },
            |m, p| {
                leased
                    .get(&(m.clone(), p.start_ms))
                    .copied()
                    .unwrap_or_default()
            },
        );
        if let Some(e) = err {
            return Err(e);
        }
        self.note_soft_overshoot(&view);
        // The next time this view changes by itself: a period end, a grant starting or ending.
        let next = view
            .meters
            .iter()
            .map(|m| m.period.end_ms)
            .chain(grants.iter().flat_map(|g| {
                [Some(g.request.effective_at_ms), g.request.expires_at_ms]
                    .into_iter()
                    .flatten()
            }))
            .filter(|t| *t > now)
            .min();
        if let Some(t) = next {
            let mut timers = relock(&self.timers);
            if timers.len() < MAX_TIMERS {
                timers.insert((t, customer.clone()));
            }
        }
        Ok(view)
    }

    /// Snapshot frames (each at most [`MAX_CUSTOMERS_PER_PUSH`] customers, `full: false`) of
    /// these customers now.
    pub fn snapshots(
        &self,
        customers: &[CustomerId],
    ) -> Result<Vec<EntitlementsSnapshot>, StoreError> {
        let mut out = Vec::new();
        for chunk in customers.chunks(MAX_CUSTOMERS_PER_PUSH) {
            let mut list = Vec::with_capacity(chunk.len());
            for c in chunk {
                list.push(self.view(c)?.to_wire());
            }
            out.push(EntitlementsSnapshot {
                version: self.next_version(),
                built_at_ms: self.clock.now_ms(),
                full: false,
                customers: BoundedVec::new(list).unwrap_or_default(),
            });
        }
        self.metrics.pushes.inc_by(out.len() as u64);
        Ok(out)
    }

    /// Answers a lease request from `agent`: the limit from the customer's view, the grant
    /// in one store transaction that locks the limit and reads `used` under the lock.
    pub fn lease(&self, agent: AgentId, req: &LeaseRequest) -> Result<LeaseGrant, StoreError> {
        let now = self.clock.now_ms();
        let view = self.view(&req.customer)?;
        let limit = view.meters.iter().find(|m| m.meter == req.meter);
        let grant = match limit {
            Some(m) => {
                let (grant, counters) =
                    self.store
                        .lease_request(agent, req, m.limit, m.period, self.limits, now)?;
                self.count(&counters);
                grant
            }
            // No limit on this meter: nothing to lease.
            None => LeaseGrant {
                request_id: req.request_id,
                customer: req.customer.clone(),
                meter: req.meter.clone(),
                lease_id: 0,
                period_start_ms: req.period_start_ms,
                granted_total: Decimal::ZERO,
                added: Decimal::ZERO,
                expires_at_ms: now,
            },
        };
        self.metrics.lease_requests.inc();
        if grant.added > Decimal::ZERO {
            self.metrics.lease_grants.inc();
            self.metrics
                .leased_outstanding
                .inc_by(grant.added.to_f64().unwrap_or(0.0));
        }
        Ok(grant)
    }

    /// `agent` ended a lease.
    pub fn release(&self, agent: AgentId, rel: &LeaseRelease) -> Result<(), StoreError> {
        let counters = self.store.lease_release(agent, rel, self.limits)?;
        self.count(&counters);
        Ok(())
    }

    /// Runs [`Entitlements::tick`] every 250 ms on a task of its own on the current (the
    /// collector's) runtime, each tick on the blocking pool (it may write the store), until
    /// `shutdown` turns true.
    pub fn spawn_ticker(
        self: Arc<Self>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                let me = self.clone();
                match tokio::task::spawn_blocking(move || me.tick()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "entitlements tick failed"),
                    Err(e) => tracing::warn!(error = %e, "entitlements tick panicked"),
                }
            }
        })
    }

    /// Reclaims expired leases (every collector on a shared store may; each lease once) and
    /// announces time-driven changes that are due.
    pub fn tick(&self) -> Result<(), StoreError> {
        let now = self.clock.now_ms();
        let counters = self.store.lease_tick(now, self.limits)?;
        self.count(&counters);
        // The outstanding gauge from the store about once a second.
        if self.ticks.fetch_add(1, Ordering::Relaxed) % 4 == 0 {
            self.refresh_outstanding()?;
        }
        let due: Vec<CustomerId> = {
            let mut timers = relock(&self.timers);
            let mut due = Vec::new();
            while let Some(first) = timers.first() {
                if first.0 > now {
                    break;
                }
                if let Some((_, c)) = timers.pop_first() {
                    due.push(c);
                }
            }
            due
        };
        for c in due {
            self.notify(Change::Customer(c));
        }
        Ok(())
    }

    /// Adds one operation's counters to this process's and to the metrics.
    fn count(&self, c: &LeaseCounters) {
        let mut total = relock(&self.counters);
        total.reclaimed += c.reclaimed;
        total.overshoot += c.overshoot;
        if c.reclaimed > 0 {
            self.metrics.reclaimed.inc_by(c.reclaimed);
        }
        let over = total.overshoot + self.store.ingest_overshoot();
        self.metrics.overshoot.set(over.to_f64().unwrap_or(0.0));
    }

    /// Σ outstanding over every lease in the store, and the overshoot gauge.
    fn refresh_outstanding(&self) -> Result<(), StoreError> {
        let total: Decimal = self
            .store
            .leases()?
            .iter()
            .filter(|l| l.reclaimed_at_ms.is_none())
            .map(crate::core::entitlements::lease::Lease::outstanding)
            .sum();
        self.metrics
            .leased_outstanding
            .set(total.to_f64().unwrap_or(0.0));
        self.count(&LeaseCounters::default());
        Ok(())
    }

    /// Records how far the customer's view is past its soft limits (the gauge sums every
    /// customer's latest figure; at most [`MAX_TIMERS`] customers are kept).
    fn note_soft_overshoot(&self, view: &CustomerView) {
        let over: Decimal = view
            .meters
            .iter()
            .filter(|m| m.enforcement == tally_protocol::entitlements::Enforcement::Soft)
            .map(|m| (m.used - m.limit).max(Decimal::ZERO))
            .sum();
        let mut map = relock(&self.soft_over);
        let changed = if over > Decimal::ZERO {
            if map.len() >= MAX_TIMERS && !map.contains_key(&view.customer) {
                return;
            }
            map.insert(view.customer.clone(), over) != Some(over)
        } else {
            map.remove(&view.customer).is_some()
        };
        if changed {
            let total: Decimal = map.values().copied().sum();
            self.metrics
                .soft_overshoot
                .set(total.to_f64().unwrap_or(0.0));
        }
    }
}

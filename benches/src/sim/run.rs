//! One seed → one run → a [`Report`]. The world advances in ticks of the one simulated clock
//! (`tally_clock::ManualClock`): faults fire, crashed processes restart, the workload calls the
//! agents, the network delivers what is due, the agents' timers and seals run, the collector
//! commits a group and answers, and the forwarder plans and sends to Stripe. After the workload
//! the faults stop, everything restarts and heals, and the run drains until every backlog is
//! empty (or gives up); then the auditor checks the end state.

use super::agent::{Accept, AgentDelivery, Crashed, SimAgent};
use super::auditor::{Inputs, audit};
use super::collector::{REQUEST_TIMEOUT_MS, Res, SimCollector};
use super::faults::{Faults, StripeRates};
use super::net::{Delivery, Net, NetRates, NetStats};
use super::rng::Rng;
use super::stripe::{Stripe, StripeStats};
use super::workload::{METERS, Op, Usage, Workload, meter_def};
use std::collections::{BTreeMap, VecDeque};
use tally_clock::{Clock, ManualClock};
use tally_collector::core::ledger::{Adjustment, Period};
use tally_collector::store::AdjustOutcome;

/// 2026-11-10T00:00:00Z: far from a month's end, so a run stays in one period.
pub const T0_MS: i64 = 1_794_268_800_000;

/// The shape of a run (the seed chooses everything else).
#[derive(Debug, Clone)]
pub struct Options {
    /// Agents.
    pub agents: usize,
    /// Simulated time with workload and faults, ms.
    pub workload_ms: i64,
    /// Most simulated time to drain after it, ms.
    pub drain_max_ms: i64,
    /// The tick, ms.
    pub tick_ms: i64,
    /// The agents' flush interval, ms.
    pub flush_ms: i64,
    /// Turns on the broken dedup (forgets seq 2) to show the auditor catches it.
    pub broken_dedup: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            agents: 3,
            workload_ms: 10_000,
            drain_max_ms: 120_000,
            tick_ms: 10,
            flush_ms: 1_000,
            broken_dedup: false,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Workload ops.
    pub ops: u64,
    /// Agent crashes (at a tick or inside an fsync).
    pub agent_crashes: u64,
    /// Collector crashes.
    pub collector_crashes: u64,
    /// Ticks the disk of some agent was full.
    pub disk_full_ticks: u64,
    /// Whether an agent was revoked.
    pub revoked: bool,
    /// Batches that reached the agents' disks.
    pub batches_sealed: u64,
    /// Batches the collector ingested (including duplicates) and duplicates among them.
    pub batches_ingested: u64,
    /// Duplicates acked.
    pub duplicates: u64,
    /// `record` calls lost in crashes (inside the loss window).
    pub record_lost: u64,
    /// Calls refused (full disk under `reject`, agent down).
    pub refused: u64,
    /// The network's counts.
    pub net: NetStats,
    /// Stripe's counts.
    pub stripe: StripeStats,
    /// Simulated time until drained, ms.
    pub sim_ms: i64,
    /// What the auditor (or the machinery) found; empty when the run passed.
    pub findings: Vec<String>,
}

impl Report {
    /// Whether the run passed.
    pub fn passed(&self) -> bool {
        self.findings.is_empty()
    }
}

/// Turns the broken dedup off again, however the run ends.
struct BrokenDedup;

impl BrokenDedup {
    fn on(on: bool) -> Option<BrokenDedup> {
        on.then(|| {
            tally_collector::core::dedup::fault::set_forgotten_seq(Some(2));
            BrokenDedup
        })
    }
}

impl Drop for BrokenDedup {
    fn drop(&mut self) {
        tally_collector::core::dedup::fault::set_forgotten_seq(None);
    }
}

struct World {
    opts: Options,
    clock: ManualClock,
    rng: Rng,
    faults: Faults,
    net: Net,
    agents: Vec<SimAgent>,
    collector: SimCollector,
    stripe: Stripe,
    workload: Workload,
    /// Adjustments waiting for the collector (the client retries).
    adjust_queue: VecDeque<(String, Usage)>,
    adjusted: BTreeMap<String, Usage>,
    revoked: Option<usize>,
    report: Report,
}

/// Runs one seed.
pub fn run(seed: u64, opts: &Options) -> Report {
    let _broken = BrokenDedup::on(opts.broken_dedup);
    let mut report = match World::new(seed, opts.clone()).and_then(World::run) {
        Ok(r) => r,
        Err(e) => Report {
            findings: vec![format!("simulation machinery failed: {e}")],
            ..Report::default()
        },
    };
    report.seed = seed;
    report
}

impl World {
    fn new(seed: u64, opts: Options) -> Res<World> {
        let mut rng = Rng::new(seed);
        let faults = Faults::draw(&mut rng.fork(1), opts.agents, opts.workload_ms);
        let net = Net::new(rng.fork(2), faults.net);
        let stripe = Stripe::new(rng.fork(3), faults.stripe, REQUEST_TIMEOUT_MS);
        let workload = Workload::new(rng.fork(4), opts.agents);
        let meters = (0..METERS.len()).map(meter_def).collect();
        let collector = SimCollector::new(rng.fork(5), meters, T0_MS)?;
        let agents = (0..opts.agents)
            .map(|i| {
                let mut a = SimAgent::new(
                    i,
                    rng.fork(100 + i as u64),
                    faults.overflow[i],
                    opts.flush_ms,
                    T0_MS,
                );
                a.crash_at_sync_ppm = faults.crash_at_sync_ppm;
                a
            })
            .collect();
        Ok(World {
            clock: ManualClock::new(T0_MS),
            rng: rng.fork(6),
            faults,
            net,
            agents,
            collector,
            stripe,
            workload,
            adjust_queue: VecDeque::new(),
            adjusted: BTreeMap::new(),
            revoked: None,
            report: Report::default(),
            opts,
        })
    }

    fn now(&self) -> i64 {
        self.clock.now_ms()
    }

    fn run(mut self) -> Res<Report> {
        let end = T0_MS + self.opts.workload_ms;
        while self.now() < end {
            self.clock.advance_ms(self.opts.tick_ms);
            self.inject_faults()?;
            self.tick(true)?;
        }
        self.heal()?;
        let give_up = self.now() + self.opts.drain_max_ms;
        while self.now() % 100 != 0 || !self.drained()? {
            if self.now() >= give_up {
                self.report
                    .findings
                    .push(String::from("did not drain within the drain time"));
                break;
            }
            self.clock.advance_ms(self.opts.tick_ms);
            self.tick(false)?;
        }
        self.finish()
    }

    fn inject_faults(&mut self) -> Res<()> {
        let now = self.now();
        let f = self.faults.clone();
        for i in 0..self.agents.len() {
            if self.agents[i].is_up() && self.rng.chance_ppm(f.agent_crash_ppm) {
                self.crash_agent(i);
            }
            if self.agents[i].disk.budget_rows.is_none() && self.rng.chance_ppm(f.disk_full_ppm) {
                let rows = self.agents[i].disk.read().rows();
                self.agents[i].disk.budget_rows = Some(rows);
                self.agents[i].budget_back_at_ms =
                    Some(now + self.rng.range(f.disk_full_ms.0, f.disk_full_ms.1));
            }
            if self.agents[i].disk.budget_rows.is_some() {
                self.report.disk_full_ticks += 1;
            }
        }
        if self.collector.is_up() && self.rng.chance_ppm(f.collector_crash_ppm) {
            self.collector.crash(now, &mut self.net);
            let (lo, hi) = f.collector_down_ms;
            self.collector.restart_at_ms = Some(now + self.rng.range(lo, hi));
        }
        if let Some((agent, at)) = f.revoke
            && self.revoked.is_none()
            && now >= T0_MS + at
        {
            let id = self.agents[agent].id;
            if self.collector.revoke(id, now, &mut self.net)? {
                self.revoked = Some(agent);
            }
        }
        Ok(())
    }

    fn crash_agent(&mut self, i: usize) {
        let now = self.now();
        self.agents[i].crash(now, &mut self.net);
        let (lo, hi) = self.faults.agent_down_ms;
        self.agents[i].restart_at_ms = Some(now + self.rng.range(lo, hi));
    }

    fn tick(&mut self, workload: bool) -> Res<()> {
        let now = self.now();
        // Restarts.
        for i in 0..self.agents.len() {
            let a = &mut self.agents[i];
            if !a.is_up() && a.restart_at_ms.is_some_and(|t| now >= t) {
                a.start(now);
            }
            if a.budget_back_at_ms.is_some_and(|t| now >= t) {
                a.disk.budget_rows = None;
                a.budget_back_at_ms = None;
            }
        }
        if !self.collector.is_up() && self.collector.restart_at_ms.is_some_and(|t| now >= t) {
            self.collector.start(now)?;
        }
        // The product.
        if workload {
            for op in self.workload.tick() {
                self.report.ops += 1;
                self.apply(op)?;
            }
        }
        self.retry_adjustments()?;
        // The network.
        let mut accepts = Vec::new();
        while let Some(d) = self.net.poll(now) {
            self.deliver(d, &mut accepts)?;
            self.accept(&mut accepts)?;
        }
        // Agents' timers and seals.
        for i in 0..self.agents.len() {
            let listening = self.collector.is_up();
            let r = self.agents[i].tick(now, &mut self.net, &mut accepts, listening);
            if let Err(Crashed) = r {
                self.crash_agent(i);
            }
            self.accept(&mut accepts)?;
        }
        // The collector: timers, one group commit, Stripe.
        self.collector.tick(now, &mut self.net)?;
        self.collector.commit(now, &mut self.net)?;
        for reply in self.stripe.step(now) {
            self.collector.stripe_reply(reply, now, &mut self.stripe)?;
        }
        self.collector.forward(now, &mut self.stripe)?;
        Ok(())
    }

    fn accept(&mut self, accepts: &mut Vec<Accept>) -> Res<()> {
        let now = self.now();
        for a in accepts.drain(..) {
            self.collector
                .accept(a.conn, a.binding, now, &mut self.net)?;
        }
        Ok(())
    }

    fn deliver(&mut self, d: Delivery, accepts: &mut Vec<Accept>) -> Res<()> {
        let now = self.now();
        let (agent, ad) = match d {
            Delivery::ToCollector { conn, frame } => {
                return self.collector.frame(conn, frame, now, &mut self.net);
            }
            Delivery::CollectorLost { conn } => {
                return self.collector.lost(conn, now, &mut self.net);
            }
            Delivery::Connected {
                agent,
                conn,
                binding,
            } => (agent, AgentDelivery::Connected { conn, binding }),
            Delivery::ConnectFailed { agent } => (agent, AgentDelivery::ConnectFailed),
            Delivery::ToAgent { agent, conn, frame } => {
                (agent, AgentDelivery::Frame { conn, frame })
            }
            Delivery::AgentLost { agent, conn } => (agent, AgentDelivery::Lost { conn }),
        };
        self.agents[agent].deliver(ad, now);
        let listening = self.collector.is_up();
        if let Err(Crashed) = self.agents[agent].pump(now, &mut self.net, accepts, listening) {
            self.crash_agent(agent);
        }
        Ok(())
    }

    fn apply(&mut self, op: Op) -> Res<()> {
        let now = self.now();
        let r = match op {
            Op::Record { agent, usage } => {
                self.agents[agent].record(&usage, now);
                Ok(())
            }
            Op::RecordEvent { agent, id, usage } => self.agents[agent]
                .record_durable(Some(id), usage, now)
                .map_err(|c| (agent, c)),
            Op::RecordDurable { agent, usage } => self.agents[agent]
                .record_durable(None, usage, now)
                .map_err(|c| (agent, c)),
            Op::Adjust { key, usage } => {
                self.adjust_queue.push_back((key, usage));
                Ok(())
            }
        };
        if let Err((agent, Crashed)) = r {
            self.crash_agent(agent);
        }
        Ok(())
    }

    fn retry_adjustments(&mut self) -> Res<()> {
        let now = self.now();
        while let Some((key, usage)) = self.adjust_queue.front().cloned() {
            let adj = Adjustment {
                customer: usage.customer.clone(),
                meter: usage.meter.clone(),
                dimensions: usage.dimensions.clone(),
                period: Period::of_ms(T0_MS),
                quantity: usage.quantity,
                reason: String::from("simulated correction"),
                idempotency_key: key.clone(),
            };
            let Some(out) = self.collector.adjust(&adj, now)? else {
                return Ok(());
            };
            self.adjust_queue.pop_front();
            match out {
                AdjustOutcome::Created(_) => {
                    if self.adjusted.insert(key.clone(), usage).is_some() {
                        self.report
                            .findings
                            .push(format!("adjustment {key} created twice"));
                    }
                }
                AdjustOutcome::Exists(_) => {
                    if !self.adjusted.contains_key(&key) {
                        self.report
                            .findings
                            .push(format!("adjustment {key} exists but was never created"));
                    }
                }
                other => self
                    .report
                    .findings
                    .push(format!("adjustment {key} answered {other:?}")),
            }
        }
        Ok(())
    }

    /// Faults stop: the network and Stripe behave, disks get room, everything restarts.
    fn heal(&mut self) -> Res<()> {
        let now = self.now();
        self.net.rates = NetRates::perfect();
        self.stripe.rates = StripeRates::default();
        let n = self.agents.len();
        self.faults = Faults::none(n);
        if !self.collector.is_up() {
            self.collector.start(now)?;
        }
        for a in &mut self.agents {
            a.crash_at_sync_ppm = 0;
            a.disk.budget_rows = None;
            a.budget_back_at_ms = None;
            if !a.is_up() {
                a.start(now);
            }
        }
        Ok(())
    }

    fn drained(&self) -> Res<bool> {
        let agents = self
            .agents
            .iter()
            .all(|a| a.drained() || (self.revoked == Some(a.index) && a.sealed_all()));
        Ok(agents
            && self.adjust_queue.is_empty()
            && self.stripe.idle()
            && self.collector.quiet()?)
    }

    fn finish(mut self) -> Res<Report> {
        let r = &mut self.report;
        r.sim_ms = self.clock.now_ms() - T0_MS;
        r.revoked = self.revoked.is_some();
        r.net = self.net.stats;
        r.stripe = self.stripe.stats;
        r.collector_crashes = self.collector.stats.crashes;
        r.batches_ingested = self.collector.stats.batches;
        r.duplicates = self.collector.stats.duplicates;
        for a in &self.agents {
            r.agent_crashes += a.model.crashes;
            r.batches_sealed += a.model.batches.len() as u64;
            r.record_lost += a.model.lost.len() as u64;
            r.refused += a.model.refused;
        }
        if self.collector.stats.checks > 0 {
            r.findings.push(format!(
                "{} unknown-outcome checks in a run shorter than 23 h",
                self.collector.stats.checks
            ));
        }
        let store = self.collector.store().ok_or("collector down at the end")?;
        let findings = audit(&Inputs {
            agents: &self.agents,
            revoked: self.revoked,
            store,
            adjustments: &self.adjusted,
            stripe: self.stripe.totals(),
            stripe_idle: self.stripe.idle(),
            flush_ms: self.opts.flush_ms,
            tick_ms: self.opts.tick_ms,
        });
        self.report.findings.extend(findings);
        Ok(self.report)
    }
}

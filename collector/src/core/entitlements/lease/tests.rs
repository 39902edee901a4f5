//! The lease book against a model of agents that consume only under their leases, seal,
//! ship, release, restart and vanish, with the ledger's `used` moved by committed batches.

use super::*;
use proptest::prelude::*;
use std::collections::VecDeque;

fn cust() -> CustomerId {
    CustomerId::new("acme").unwrap()
}
fn meter() -> MeterName {
    MeterName::new("api_calls").unwrap()
}
const PERIOD: PeriodRange = PeriodRange {
    start_ms: 0,
    end_ms: 10_000_000,
};

fn agent(i: u8) -> AgentId {
    AgentId([i; 16])
}

fn req(id: u64, qty: u32) -> LeaseRequest {
    LeaseRequest {
        request_id: id,
        customer: cust(),
        meter: meter(),
        period_start_ms: PERIOD.start_ms,
        quantity: Decimal::from(qty),
    }
}

fn limits() -> LeaseBookLimits {
    LeaseBookLimits {
        ttl_ms: 1_000,
        grace_ms: 500,
        ..LeaseBookLimits::default()
    }
}

#[test]
fn grants_are_capped_by_what_remains_and_shared() {
    let mut b = LeaseBook::new(limits());
    let input = LimitInput {
        limit: Decimal::from(100),
        used: Decimal::from(10),
        period: PERIOD,
    };
    let g = b.request(0, agent(1), &req(1, 200), input);
    assert_eq!(
        (g.added, g.granted_total),
        (Decimal::from(90), Decimal::from(90))
    );
    let g2 = b.request(0, agent(2), &req(2, 5), input);
    assert_eq!(g2.added, Decimal::ZERO);
    assert_eq!(g2.lease_id, 0);
    assert_eq!(b.outstanding(&cust(), &meter(), 0), Decimal::from(90));
    // 40 of agent 1's lease is shipped and committed (used moves with it).
    b.on_batch(
        agent(1),
        1,
        1,
        true,
        &[(cust(), meter(), 5, Decimal::from(40))],
    );
    let input = LimitInput {
        used: Decimal::from(50),
        ..input
    };
    assert_eq!(b.outstanding(&cust(), &meter(), 0), Decimal::from(50));
    // Nothing left for agent 2 until agent 1 releases.
    assert_eq!(
        b.request(1, agent(2), &req(3, 5), input).added,
        Decimal::ZERO
    );
    b.release(
        agent(1),
        &LeaseRelease {
            lease_id: g.lease_id,
            epoch: 1,
            through_seq: 2,
        },
    );
    // Held until seq 2 is acknowledged.
    assert_eq!(b.outstanding(&cust(), &meter(), 0), Decimal::from(50));
    b.on_batch(
        agent(1),
        1,
        2,
        true,
        &[(cust(), meter(), 5, Decimal::from(10))],
    );
    let input = LimitInput {
        used: Decimal::from(60),
        ..input
    };
    assert_eq!(b.outstanding_total(), Decimal::ZERO);
    let g3 = b.request(2, agent(2), &req(4, 100), input);
    assert_eq!(g3.added, Decimal::from(40));
    // A second agent asking now gets at most half of what is left.
    let input = LimitInput {
        limit: Decimal::from(200),
        ..input
    };
    let g4 = b.request(3, agent(1), &req(5, 500), input);
    assert_eq!(g4.added, Decimal::from(50));
}

#[test]
fn unreleased_leases_are_reclaimed_and_late_usage_is_overshoot() {
    let mut b = LeaseBook::new(limits());
    let input = LimitInput {
        limit: Decimal::from(10),
        used: Decimal::ZERO,
        period: PERIOD,
    };
    let g = b.request(0, agent(1), &req(1, 10), input);
    assert_eq!(g.expires_at_ms, 1_000);
    assert_eq!(b.poll_timeout(), Some(1_500));
    b.tick(1_499);
    assert_eq!(b.outstanding_total(), Decimal::from(10));
    b.tick(1_500);
    assert_eq!(b.outstanding_total(), Decimal::ZERO);
    assert_eq!(b.counters().reclaimed, 1);
    b.on_batch(
        agent(1),
        1,
        1,
        true,
        &[(cust(), meter(), 5, Decimal::from(3))],
    );
    assert_eq!(b.counters().overshoot, Decimal::from(3));
}

#[test]
fn a_restored_book_keeps_its_leases_and_ids() {
    let mut b = LeaseBook::new(limits());
    let input = LimitInput {
        limit: Decimal::from(10),
        used: Decimal::ZERO,
        period: PERIOD,
    };
    let g = b.request(0, agent(1), &req(1, 4), input);
    let kept: Vec<Lease> = b.leases().cloned().collect();
    let mut r = LeaseBook::restore(limits(), kept);
    assert_eq!(r.outstanding_total(), Decimal::from(4));
    let g2 = r.request(1, agent(2), &req(2, 100), input);
    assert!(g2.lease_id > g.lease_id);
    assert_eq!(g2.added, Decimal::from(3));
}

#[derive(Debug, Clone)]
enum Op {
    Request(u8, u8),
    Consume(u8, u8),
    Seal(u8),
    Deliver(u8),
    Release(u8),
    Restart(u8),
    Advance(u16),
    Grant(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u8..3, 1u8..20).prop_map(|(a, q)| Op::Request(a, q)),
        4 => (0u8..3, 1u8..10).prop_map(|(a, q)| Op::Consume(a, q)),
        2 => (0u8..3).prop_map(Op::Seal),
        3 => (0u8..3).prop_map(Op::Deliver),
        1 => (0u8..3).prop_map(Op::Release),
        1 => (0u8..3).prop_map(Op::Restart),
        1 => (0u16..1_200).prop_map(Op::Advance),
        1 => (1u8..20).prop_map(Op::Grant),
    ]
}

#[derive(Debug, Default)]
struct ModelAgent {
    epoch: u64,
    next_seq: u64,
    lease: Option<(u64, Decimal, i64)>,
    consumed: Decimal,
    unsealed: Decimal,
    /// Sealed, not yet committed: (epoch, seq, qty).
    disk: VecDeque<(u64, u64, Decimal)>,
}

impl ModelAgent {
    fn seal(&mut self) {
        if self.unsealed > Decimal::ZERO {
            self.next_seq += 1;
            self.disk
                .push_back((self.epoch, self.next_seq, self.unsealed));
            self.unsealed = Decimal::ZERO;
        }
    }

    fn release(&mut self, me: AgentId, book: &mut LeaseBook) {
        self.seal();
        if let Some((id, _, _)) = self.lease.take() {
            book.release(
                me,
                &LeaseRelease {
                    lease_id: id,
                    epoch: self.epoch,
                    through_seq: self.next_seq,
                },
            );
        }
        self.consumed = Decimal::ZERO;
    }
}

struct World {
    book: LeaseBook,
    agents: Vec<ModelAgent>,
    limit: Decimal,
    used: Decimal,
    now: i64,
    next_req: u64,
}

impl World {
    fn new() -> Self {
        World {
            book: LeaseBook::new(limits()),
            agents: (0..3)
                .map(|_| ModelAgent {
                    epoch: 1,
                    ..ModelAgent::default()
                })
                .collect(),
            limit: Decimal::from(40),
            used: Decimal::ZERO,
            now: 0,
            next_req: 1,
        }
    }

    fn input(&self) -> LimitInput {
        LimitInput {
            limit: self.limit,
            used: self.used,
            period: PERIOD,
        }
    }

    fn deliver(&mut self, a: usize) {
        if let Some((epoch, seq, qty)) = self.agents[a].disk.pop_front() {
            self.used += qty;
            let at = self.now;
            self.book.on_batch(
                agent(a as u8),
                epoch,
                seq,
                true,
                &[(cust(), meter(), at, qty)],
            );
        }
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Request(a, q) => {
                let a = usize::from(a);
                // An agent releases an expired lease before it asks again.
                if self.agents[a]
                    .lease
                    .is_some_and(|(_, _, exp)| self.now >= exp)
                {
                    self.agents[a].release(agent(a as u8), &mut self.book);
                }
                let r = req(self.next_req, u32::from(q));
                self.next_req += 1;
                let input = self.input();
                let g = self.book.request(self.now, agent(a as u8), &r, input);
                let ag = &mut self.agents[a];
                if g.lease_id != 0 {
                    if ag.lease.is_some_and(|(id, _, _)| id != g.lease_id) {
                        // A new lease only after the old one was released.
                        panic!("two open leases for one agent");
                    }
                    ag.lease = Some((g.lease_id, g.granted_total, g.expires_at_ms));
                }
            }
            Op::Consume(a, q) => {
                let ag = &mut self.agents[usize::from(a)];
                let q = Decimal::from(q);
                if let Some((_, granted, exp)) = ag.lease
                    && self.now < exp
                    && ag.consumed + q <= granted
                {
                    ag.consumed += q;
                    ag.unsealed += q;
                }
            }
            Op::Seal(a) => self.agents[usize::from(a)].seal(),
            Op::Deliver(a) => self.deliver(usize::from(a)),
            Op::Release(a) => {
                let a = usize::from(a);
                self.agents[a].release(agent(a as u8), &mut self.book);
            }
            Op::Restart(a) => {
                let a = usize::from(a);
                let ag = &mut self.agents[a];
                // What was consumed and not sealed is lost; the lease on disk is released
                // through the last sealed seq of the old epoch; a new epoch begins.
                ag.unsealed = Decimal::ZERO;
                ag.release(agent(a as u8), &mut self.book);
                ag.epoch += 1;
                ag.next_seq = 0;
            }
            Op::Advance(ms) => {
                self.now += i64::from(ms);
                self.book.tick(self.now);
            }
            Op::Grant(q) => self.limit += Decimal::from(q),
        }
    }

    fn check(&self) -> Result<(), TestCaseError> {
        let out = self.book.outstanding(&cust(), &meter(), 0);
        prop_assert!(out >= Decimal::ZERO);
        prop_assert!(
            self.used + out <= self.limit + self.book.counters().overshoot,
            "used {} + outstanding {} > limit {} (+ overshoot {})",
            self.used,
            out,
            self.limit,
            self.book.counters().overshoot
        );
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn used_plus_outstanding_never_passes_the_limit(ops in proptest::collection::vec(op(), 1..200)) {
        let mut w = World::new();
        for op in &ops {
            w.step(op);
            w.check()?;
        }
        // Settle: every agent releases, every batch is delivered.
        for a in 0..3 {
            w.agents[a].release(agent(a as u8), &mut w.book);
            while !w.agents[a].disk.is_empty() {
                w.deliver(a);
                w.check()?;
            }
        }
        prop_assert_eq!(w.book.outstanding_total(), Decimal::ZERO);
        prop_assert_eq!(w.book.leases().count(), 0);
        // Without reclaims nothing overshoots and the limit holds for what was used.
        if w.book.counters().reclaimed == 0 {
            prop_assert_eq!(w.book.counters().overshoot, Decimal::ZERO);
            prop_assert!(w.used <= w.limit);
        }
    }
}

//! Unit and property tests of the ledger rules, driven through an in-memory ledger that applies
//! exactly the steps a store does (dedup → post → append), and checked against a simple model.

use super::*;
use crate::core::dedup::DedupState;
use proptest::prelude::*;
use tally_protocol::bounded::BoundedVec;
use tally_protocol::catalog::MeterDef;
use tally_protocol::frame::AckOutcome;

fn meter(name: &str, aggregation: Aggregation) -> MeterDef {
    MeterDef {
        name: MeterName::new(name).unwrap(),
        aggregation,
        event_type: name.to_owned(),
        value_property: Some(String::from("$.v")),
        group_by: BoundedVec::default(),
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    }
}

fn catalog() -> Catalog {
    Catalog {
        version: 1,
        meters: BoundedVec::new(vec![
            meter("calls", Aggregation::Sum),
            meter("events", Aggregation::Count),
            meter("seats", Aggregation::Last),
        ])
        .unwrap(),
    }
}

/// The steps of a store, in memory.
#[derive(Default)]
struct Mem {
    ws: WorkingSet,
    transfers: Vec<Transfer>,
    dedup: HashMap<(AgentId, u64), DedupState>,
    batches: HashMap<(AgentId, u64, u64), u32>,
    adjustments: HashMap<String, TransferId>,
}

impl Mem {
    fn ingest(&mut self, catalog: &Catalog, body: &BatchBody) -> AckOutcome {
        let state = self.dedup.entry((body.agent_id, body.epoch)).or_default();
        if state.contains(body.seq) {
            return AckOutcome::Duplicate;
        }
        let out = match post_batch(&mut self.ws, &mut NoAccounts, catalog, body, 0) {
            Ok(Ok(p)) => {
                self.transfers.extend(p.transfers);
                self.batches.insert(
                    (body.agent_id, body.epoch, body.seq),
                    body.deltas.len() as u32,
                );
                AckOutcome::Committed
            }
            Ok(Err(r)) => AckOutcome::Quarantined { code: r.code },
            Err(e) => match e {},
        };
        let state = self.dedup.entry((body.agent_id, body.epoch)).or_default();
        assert_eq!(state.insert(body.seq), Ok(true));
        out
    }

    fn adjust(&mut self, catalog: &Catalog, adj: &Adjustment) -> Result<bool, String> {
        if let Some(id) = self.adjustments.get(&adj.idempotency_key) {
            let stored = self.transfers.iter().find(|t| t.id == *id).unwrap();
            return if stored.amount == adj.quantity.abs() {
                Ok(false)
            } else {
                Err(String::from("different"))
            };
        }
        match post_adjustment(&mut self.ws, &mut NoAccounts, catalog, adj, 0) {
            Ok(Ok(p)) => {
                self.adjustments
                    .insert(adj.idempotency_key.clone(), p.transfers[0].id);
                self.transfers.extend(p.transfers);
                Ok(true)
            }
            Ok(Err(r)) => Err(r.message),
            Err(e) => match e {},
        }
    }

    fn verify(&self) -> VerifyReport {
        let mut v = Verifier::new();
        for t in &self.transfers {
            let trace = match &t.source {
                TransferSource::BatchRow {
                    agent,
                    epoch,
                    seq,
                    row,
                } => trace_batch_row(
                    self.batches.get(&(*agent, *epoch, *seq)).copied(),
                    self.dedup.get(&(*agent, *epoch)),
                    *seq,
                    *row,
                ),
                TransferSource::Adjustment {
                    idempotency_key, ..
                } => match self.adjustments.get(idempotency_key) {
                    Some(id) if *id == t.id => Ok(()),
                    _ => Err(String::from("no adjustment")),
                },
                TransferSource::Grant { .. } => Err(String::from("this model posts no grants")),
            };
            v.transfer(t, trace);
        }
        for (id, a) in &self.ws.accounts {
            v.account(*id, a);
        }
        v.finish()
    }

    fn usage(&self, customer: &str, meter: &str) -> Decimal {
        self.usage_in(customer, meter, None)
    }

    fn usage_in(&self, customer: &str, meter: &str, period: Option<Period>) -> Decimal {
        self.ws.accounts
            .values()
            .filter(|a| {
                matches!(&a.key, AccountKey::Usage { customer: c, meter: m, period: p, .. }
                    if c.as_str() == customer && m.as_str() == meter && period.is_none_or(|x| x == *p))
            })
            .map(Account::balance)
            .sum()
    }
}

fn delta(customer: &str, meter: &str, at_ms: i64, sum: Decimal, count: u64) -> Delta {
    let mut d = Delta::single(
        CustomerId::new(customer).unwrap(),
        MeterName::new(meter).unwrap(),
        Dimensions::default(),
        at_ms,
        sum,
    );
    d.count = count;
    d
}

fn body(agent: u8, epoch: u64, seq: u64, deltas: Vec<Delta>) -> BatchBody {
    BatchBody::new(AgentId([agent; 16]), epoch, seq, 0, deltas).unwrap()
}

#[test]
fn periods_are_utc_calendar_months() {
    assert_eq!(Period::of_ms(0).to_string(), "1970-01");
    assert_eq!(Period::of_ms(1_763_000_000_000).to_string(), "2025-11");
    // 2024-02-29T23:59:59.999Z and the next millisecond.
    assert_eq!(Period::of_ms(1_709_251_199_999).to_string(), "2024-02");
    assert_eq!(Period::of_ms(1_709_251_200_000).to_string(), "2024-03");
    assert_eq!(Period::of_ms(-1).to_string(), "1969-12");
    assert_eq!(
        Period::parse("2025-11"),
        Some(Period {
            year: 2025,
            month: 11
        })
    );
    for bad in [
        "2025-13", "2025-1", "25-11", "2025-00", "2025_11", "abcd-ef",
    ] {
        assert_eq!(Period::parse(bad), None, "{bad}");
    }
}

#[test]
fn sum_count_and_last_rules() {
    let c = catalog();
    let mut m = Mem::default();
    let t0 = 1_763_000_000_000;
    let b = body(
        1,
        1,
        1,
        vec![
            delta("a", "calls", t0, Decimal::new(15, 1), 3),
            delta("a", "events", t0, Decimal::new(99, 0), 4),
            delta("a", "seats", t0 + 120_000, Decimal::from(5), 1),
        ],
    );
    assert_eq!(m.ingest(&c, &b), AckOutcome::Committed);
    // An older `last` value does not move the balance; a newer lower one does.
    let b2 = body(
        1,
        1,
        2,
        vec![
            delta("a", "seats", t0, Decimal::from(50), 1),
            delta("a", "seats", t0 + 240_000, Decimal::from(2), 1),
        ],
    );
    assert_eq!(m.ingest(&c, &b2), AckOutcome::Committed);
    assert_eq!(m.usage("a", "calls"), Decimal::new(15, 1));
    assert_eq!(m.usage("a", "events"), Decimal::from(4));
    assert_eq!(m.usage("a", "seats"), Decimal::from(2));
    assert_eq!(m.ingest(&c, &b), AckOutcome::Duplicate);
    let r = m.verify();
    assert!(r.ok, "{r:?}");
    assert_eq!(r.transfers, 5);
}

#[test]
fn unpostable_batches_post_nothing() {
    let c = catalog();
    let mut m = Mem::default();
    let t0 = 1_763_000_000_000;
    let huge = Decimal::MAX;
    let cases = [
        (
            vec![
                delta("a", "calls", t0, Decimal::ONE, 1),
                delta("a", "nope", t0, Decimal::ONE, 1),
            ],
            ErrorCode::UnknownMeter,
        ),
        (
            vec![delta("a", "calls", t0, Decimal::ONE, 0)],
            ErrorCode::InvalidDelta,
        ),
        (
            vec![
                delta("a", "calls", t0, huge, 1),
                delta("a", "calls", t0, huge, 1),
            ],
            ErrorCode::Overflow,
        ),
    ];
    for (seq, (deltas, code)) in cases.into_iter().enumerate() {
        let out = m.ingest(&c, &body(1, 1, seq as u64 + 1, deltas));
        assert_eq!(out, AckOutcome::Quarantined { code });
    }
    assert!(m.transfers.is_empty());
    assert!(m.ws.accounts.is_empty());
    assert!(m.verify().ok);
    // A batch that overflows half-way leaves existing accounts exactly as they were.
    assert_eq!(
        m.ingest(
            &c,
            &body(
                1,
                1,
                9,
                vec![
                    delta("a", "calls", t0, Decimal::ONE, 1),
                    delta("a", "seats", t0, Decimal::ONE, 1)
                ]
            )
        ),
        AckOutcome::Committed
    );
    let before: Vec<(AccountId, Account)> = {
        let mut v: Vec<_> = m.ws.accounts.iter().map(|(k, a)| (*k, a.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v
    };
    let bad = vec![
        delta("a", "seats", t0 + 1000, Decimal::TEN, 1),
        delta("b", "calls", t0, Decimal::ONE, 1),
        delta("a", "calls", t0, huge, 1),
    ];
    assert_eq!(
        m.ingest(&c, &body(1, 1, 10, bad)),
        AckOutcome::Quarantined {
            code: ErrorCode::Overflow
        }
    );
    let mut after: Vec<_> = m.ws.accounts.iter().map(|(k, a)| (*k, a.clone())).collect();
    after.sort_by_key(|(k, _)| *k);
    assert_eq!(before, after);
    assert!(m.verify().ok);
}

#[test]
fn adjustments_are_new_transfers_and_idempotent() {
    let c = catalog();
    let mut m = Mem::default();
    let t0 = 1_763_000_000_000;
    m.ingest(
        &c,
        &body(1, 1, 1, vec![delta("a", "calls", t0, Decimal::from(10), 1)]),
    );
    let adj = |q: i64, key: &str| Adjustment {
        customer: CustomerId::new("a").unwrap(),
        meter: MeterName::new("calls").unwrap(),
        dimensions: Dimensions::default(),
        period: Period::of_ms(t0),
        quantity: Decimal::from(q),
        reason: String::from("test"),
        idempotency_key: key.to_owned(),
    };
    assert_eq!(m.adjust(&c, &adj(-4, "k1")), Ok(true));
    assert_eq!(m.adjust(&c, &adj(-4, "k1")), Ok(false));
    assert!(m.adjust(&c, &adj(-3, "k1")).is_err());
    assert!(m.adjust(&c, &adj(-7, "k2")).is_err(), "would go below zero");
    assert_eq!(m.adjust(&c, &adj(2, "k3")), Ok(true));
    assert_eq!(m.usage("a", "calls"), Decimal::from(8));
    assert_eq!(m.transfers.len(), 3);
    assert!(m.verify().ok);
}

#[test]
fn verify_finds_tampering() {
    let c = catalog();
    let t0 = 1_763_000_000_000;
    let fresh = || {
        let mut m = Mem::default();
        m.ingest(
            &c,
            &body(
                1,
                1,
                1,
                vec![
                    delta("a", "calls", t0, Decimal::from(10), 1),
                    delta("b", "calls", t0, Decimal::from(3), 1),
                ],
            ),
        );
        assert!(m.verify().ok);
        m
    };
    // A balance edited.
    let mut m = fresh();
    let id = *m.ws.accounts.keys().next().unwrap();
    m.ws.accounts.get_mut(&id).unwrap().credits += Decimal::ONE;
    assert!(!m.verify().ok);
    // A transfer removed.
    let mut m = fresh();
    m.transfers.pop();
    assert!(!m.verify().ok);
    // A transfer's amount edited (balances and unit sums no longer agree).
    let mut m = fresh();
    m.transfers[0].amount += Decimal::ONE;
    assert!(!m.verify().ok);
    // A transfer duplicated.
    let mut m = fresh();
    let t = m.transfers[0].clone();
    m.transfers.push(t);
    assert!(!m.verify().ok);
    // A transfer whose batch is not recorded.
    let mut m = fresh();
    m.batches.clear();
    let r = m.verify();
    assert!(!r.ok);
    assert_eq!(r.violation_count, 2);
}

#[test]
fn transfer_ids_derive_from_source() {
    let a = AgentId([1; 16]);
    assert_ne!(usage_transfer_id(a, 1, 1, 0), usage_transfer_id(a, 1, 1, 1));
    assert_ne!(usage_transfer_id(a, 1, 2, 0), usage_transfer_id(a, 2, 1, 0));
    assert_eq!(usage_transfer_id(a, 1, 1, 0), usage_transfer_id(a, 1, 1, 0));
    let t = bare_transfer(2, 3);
    let mut u = t.clone();
    u.posted_at_ms = 99;
    assert_eq!(compare_existing(&t, &u), Existing::Exists);
    u.amount = Decimal::TWO;
    assert_eq!(
        compare_existing(&t, &u),
        Existing::ExistsWithDifferent("amount")
    );
}

// ---------------------------------------------------------------------------------------------
// Property: random batches, duplicates, reorders and adjustments → totals equal a simple model.

#[derive(Debug, Clone)]
struct GenDelta {
    customer: u8,
    meter: u8, // 0 calls, 1 events, 2 seats, 3 unknown
    minute: i64,
    mantissa: i64,
    scale: u32,
    count: u64,
}

#[derive(Debug, Clone)]
enum Op {
    Batch {
        agent: u8,
        epoch: u64,
        seq: u64,
    },
    Adjust {
        customer: u8,
        quantity: i64,
        key: u8,
    },
}

fn gen_delta() -> impl Strategy<Value = GenDelta> {
    (
        0u8..4,
        prop_oneof![8 => 0u8..3, 1 => Just(3u8)],
        0i64..(60 * 24 * 62),
        0i64..1_000_000,
        0u32..4,
        0u64..5,
    )
        .prop_map(
            |(customer, meter, minute, mantissa, scale, count)| GenDelta {
                customer,
                meter,
                minute,
                mantissa,
                scale,
                count,
            },
        )
}

fn to_delta(g: &GenDelta) -> Delta {
    let names = ["calls", "events", "seats", "ghost"];
    let at = 1_761_955_200_000 + g.minute * 60_000 + 1_000;
    // count 0 makes an invalid delta (quarantined) about 1 time in 5.
    delta(
        &format!("c{}", g.customer),
        names[g.meter as usize],
        at,
        Decimal::new(g.mantissa, g.scale),
        g.count,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn ledger_matches_a_model(
        contents in proptest::collection::vec(proptest::collection::vec(gen_delta(), 1..6), 12),
        ops in proptest::collection::vec(
            prop_oneof![
                6 => (0u8..2, 1u64..3, 1u64..4).prop_map(|(agent, epoch, seq)| Op::Batch { agent, epoch, seq }),
                1 => (0u8..4, -5i64..5, 0u8..4).prop_map(|(customer, quantity, key)| Op::Adjust { customer, quantity, key }),
            ],
            0..60,
        ),
    ) {
        let c = catalog();
        let mut m = Mem::default();
        // Model: (customer, meter) -> expected usage; `last` keeps (at, value) of the newest.
        let mut sums: HashMap<(String, &str, Period), Decimal> = HashMap::new();
        let mut lasts: HashMap<(String, Period), (i64, Decimal)> = HashMap::new();
        let mut done: HashSet<(u8, u64, u64)> = HashSet::new();
        let mut adj_keys: HashMap<u8, i64> = HashMap::new();
        for op in &ops {
            match *op {
                Op::Batch { agent, epoch, seq } => {
                    // The same (agent, epoch, seq) always carries the same content: resends.
                    let idx = (agent as usize * 6 + (epoch as usize - 1) * 3 + seq as usize - 1) % contents.len();
                    let deltas: Vec<Delta> = contents[idx].iter().map(to_delta).collect();
                    let out = m.ingest(&c, &body(agent, epoch, seq, deltas.clone()));
                    if !done.insert((agent, epoch, seq)) {
                        prop_assert_eq!(out, AckOutcome::Duplicate);
                        continue;
                    }
                    let postable = deltas.iter().all(|d| d.count > 0 && d.meter.as_str() != "ghost");
                    prop_assert_eq!(out == AckOutcome::Committed, postable);
                    if !postable {
                        continue;
                    }
                    for d in &deltas {
                        let p = Period::of_ms(d.bucket_start_ms);
                        match d.meter.as_str() {
                            "calls" => *sums.entry((d.customer.to_string(), "calls", p)).or_default() += d.sum,
                            "events" => *sums.entry((d.customer.to_string(), "events", p)).or_default() += Decimal::from(d.count),
                            _ => {
                                let e = lasts.entry((d.customer.to_string(), p)).or_insert((i64::MIN, Decimal::ZERO));
                                if (d.last_at_ms, d.last) > *e {
                                    *e = (d.last_at_ms, d.last);
                                }
                            }
                        }
                    }
                }
                Op::Adjust { customer, quantity, key } => {
                    if quantity == 0 {
                        continue;
                    }
                    // All adjustments in the model's single period (the first month).
                    let adj = Adjustment {
                        customer: CustomerId::new(format!("c{customer}")).unwrap(),
                        meter: MeterName::new("calls").unwrap(),
                        dimensions: Dimensions::default(),
                        period: Period::of_ms(1_761_955_200_000),
                        quantity: Decimal::from(quantity),
                        reason: String::from("prop"),
                        idempotency_key: format!("k{key}"),
                    };
                    let before = m.usage(&format!("c{customer}"), "calls");
                    let r = m.adjust(&c, &adj);
                    match adj_keys.get(&key) {
                        Some(q) if q.abs() == quantity.abs() => prop_assert_eq!(r, Ok(false)),
                        Some(_) => prop_assert!(r.is_err()),
                        None => {
                            // Refused only when it would take that month's usage below zero.
                            let month: Decimal = m.ws.accounts.values().filter(|a| matches!(&a.key,
                                AccountKey::Usage { customer: cu, meter: me, period, .. }
                                if cu.as_str() == format!("c{customer}") && me.as_str() == "calls" && *period == adj.period))
                                .map(Account::balance).sum();
                            if r.is_ok() {
                                adj_keys.insert(key, quantity);
                                *sums.entry((format!("c{customer}"), "calls", adj.period)).or_default() += Decimal::from(quantity);
                                prop_assert_eq!(m.usage(&format!("c{customer}"), "calls"), before + Decimal::from(quantity));
                            } else {
                                prop_assert!(month + Decimal::from(quantity) < Decimal::ZERO);
                            }
                        }
                    }
                }
            }
            let report = m.verify();
            prop_assert!(report.ok, "{:?}", report);
        }
        for ((customer, meter, period), want) in &sums {
            prop_assert_eq!(m.usage_in(customer, meter, Some(*period)), *want, "{} {} {}", customer, meter, period);
        }
        for ((customer, period), (_, value)) in &lasts {
            // A `last` meter's usage in a month is its newest value, whatever the arrival order.
            prop_assert_eq!(m.usage_in(customer, "seats", Some(*period)), *value, "{} {}", customer, period);
        }
    }
}

fn bare_transfer(debit: AccountId, credit: AccountId) -> Transfer {
    Transfer {
        id: 1,
        debit,
        credit,
        unit: MeterName::new("calls").unwrap(),
        amount: Decimal::ONE,
        events: 1,
        customer: CustomerId::new("c").unwrap(),
        event_at_ms: 0,
        posted_at_ms: 0,
        source: TransferSource::Adjustment {
            idempotency_key: String::from("k"),
            reason: String::from("r"),
        },
    }
}

#[test]
#[should_panic(expected = "is not in the working set")]
fn a_missing_account_is_a_programming_error_not_an_overflow() {
    let mut ws = WorkingSet::new();
    let _ = ws.apply(&bare_transfer(1, 2));
}

#[test]
#[should_panic(expected = "ledger out of balance in unit calls")]
fn an_unbalanced_working_set_fails_before_commit() {
    let mut ws = WorkingSet::new();
    let key = AccountKey::Source {
        meter: MeterName::new("calls").unwrap(),
    };
    let mut a = Account::new(key.clone());
    a.debits = Decimal::ONE;
    ws.accounts.insert(key.id(), a);
    ws.assert_balanced();
}

#[test]
fn a_posted_working_set_balances() {
    let mut ws = WorkingSet::new();
    let b = body(1, 1, 1, vec![delta("c", "calls", 0, Decimal::new(5, 0), 2)]);
    let p = post_batch(&mut ws, &mut NoAccounts, &catalog(), &b, 0).unwrap();
    assert!(p.is_ok());
    ws.assert_balanced();
}

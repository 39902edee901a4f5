//! The collector's entitlements: a lease grant and its settlement in the lease book with 10,000
//! other leases open, a customer's view (plan with 5 limits, 20 grants), and a lease request
//! through the entitlements handle over the embedded store (one fsync per grant).
//!
//! `cargo bench -p tally-benches --bench leases`

use criterion::{Criterion, criterion_group, criterion_main};
use rust_decimal::Decimal;
use std::hint::black_box;
use std::sync::Arc;
use tally_collector::core::entitlements::lease::{LeaseBook, LeaseBookLimits, LimitInput};
use tally_collector::core::entitlements::period::calendar_month;
use tally_collector::core::entitlements::{
    CustomerSettings, Grant, GrantRequest, LimitDef, Plan, Reset, build_customer,
};
use tally_collector::entitlements::{EntitlementMetrics, Entitlements};
use tally_collector::store::Store;
use tally_collector::store::entitlements::EntitlementStore;
use tally_collector::store::redb::RedbStore;
use tally_protocol::batch::AgentId;
use tally_protocol::entitlements::{LeaseRelease, LeaseRequest};
use tally_protocol::names::{CustomerId, MeterName, PlanName};

const NOW: i64 = 1_764_633_600_000;

fn limit(included: i64) -> LimitDef {
    LimitDef {
        included: Decimal::from(included),
        enforcement: tally_protocol::entitlements::Enforcement::Hard,
        reset: Reset::Calendar,
    }
}

fn req(customer: &CustomerId, meter: &MeterName, id: u64) -> LeaseRequest {
    LeaseRequest {
        request_id: id,
        customer: customer.clone(),
        meter: meter.clone(),
        period_start_ms: 0,
        quantity: Decimal::from(10),
    }
}

fn lease_book(c: &mut Criterion) {
    let meter = MeterName::new("api_calls").expect("valid");
    let period = calendar_month(NOW);
    let input = LimitInput {
        limit: Decimal::from(1_000_000),
        used: Decimal::ZERO,
        period,
    };
    let mut book = LeaseBook::new(LeaseBookLimits::default());
    for i in 0..10_000u32 {
        let cust = CustomerId::new(format!("c{i}")).expect("valid");
        book.request(
            NOW,
            AgentId([1; 16]),
            &req(&cust, &meter, u64::from(i)),
            input,
        );
    }
    let _ = book.take_changes();
    let hot = CustomerId::new("hot").expect("valid");
    let agent = AgentId([2; 16]);
    let mut seq = 0u64;
    c.bench_function("lease_book/grant_ship_release_settle", |b| {
        b.iter(|| {
            seq += 1;
            let g = book.request(NOW, agent, &req(&hot, &meter, seq), input);
            book.on_batch(
                agent,
                1,
                seq,
                true,
                &[(hot.clone(), meter.clone(), NOW, g.added)],
            );
            book.release(
                agent,
                &LeaseRelease {
                    lease_id: g.lease_id,
                    epoch: 1,
                    through_seq: seq,
                },
            );
            black_box(book.take_changes());
        });
    });
}

fn view(c: &mut Criterion) {
    let mut plan = Plan::default();
    for m in ["a", "b", "c", "d", "e"] {
        plan.limits
            .insert(MeterName::new(m).expect("valid"), limit(1_000));
    }
    let customer = CustomerId::new("acme").expect("valid");
    let grants: Vec<Grant> = (0..20)
        .map(|i| Grant {
            request: GrantRequest {
                customer: customer.clone(),
                meter: MeterName::new(["a", "b", "c", "d", "e"][i % 5]).expect("valid"),
                quantity: Decimal::from(100),
                priority: (i % 3) as u32,
                effective_at_ms: NOW - 1_000,
                expires_at_ms: Some(NOW + i as i64 * 1_000),
                idempotency_key: format!("g{i}"),
            },
            transfer_id: 0,
            position: 0,
            created_at_ms: NOW,
        })
        .collect();
    let settings = CustomerSettings::default();
    let name = PlanName::new("pro").expect("valid");
    c.bench_function("view/5_limits_20_grants", |b| {
        b.iter(|| {
            black_box(build_customer(
                &customer,
                Some(&name),
                Some(&plan),
                &settings,
                &grants,
                NOW,
                |_, _| Decimal::from(1_500),
                |_, _| Decimal::from(10),
            ))
        });
    });
}

fn handle_over_redb(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(RedbStore::open(&dir.path().join("c.redb")).expect("open"));
    let meter = MeterName::new("api_calls").expect("valid");
    let def = tally_protocol::catalog::MeterDef {
        name: meter.clone(),
        aggregation: tally_protocol::catalog::Aggregation::Sum,
        event_type: String::from("api_calls"),
        value_property: Some(String::from("$.value")),
        group_by: Default::default(),
        stripe_event_name: None,
        stripe_unit_scale: Decimal::ONE,
    };
    store.put_meter(&def).expect("meter");
    let mut plan = Plan::default();
    plan.limits.insert(meter.clone(), limit(1_000_000_000));
    let pname = PlanName::new("pro").expect("valid");
    store.put_plan(&pname, &plan).expect("plan");
    let customer = CustomerId::new("acme").expect("valid");
    store
        .put_customer(
            "acme",
            &tally_collector::store::CustomerRecord {
                stripe_customer_id: None,
                plan: Some(String::from("pro")),
            },
        )
        .expect("customer");
    let clock: tally_collector::tally_clock::SharedClock =
        Arc::new(tally_collector::tally_clock::ManualClock::new(NOW));
    let ent = Entitlements::open(
        store.clone(),
        store,
        clock,
        LeaseBookLimits::default(),
        EntitlementMetrics::default(),
    )
    .expect("open");
    let mut id = 0;
    let mut g = c.benchmark_group("handle");
    g.sample_size(20);
    g.bench_function("lease_request_redb_fsync", |b| {
        b.iter(|| {
            id += 1;
            black_box(
                ent.lease(AgentId([3; 16]), &req(&customer, &meter, id))
                    .expect("lease"),
            )
        });
    });
    g.finish();
}

criterion_group!(benches, lease_book, view, handle_over_redb);
criterion_main!(benches);

//! A counting global allocator proves that `record()`, `record_with()` and `Counter::add()`
//! allocate nothing once this thread has seen the key (SPEC §9). In a file of its own so the
//! allocator affects only this test binary.
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::Duration;
use tally_agent::Agent;
use tally_protocol::Decimal;

struct Counting;

thread_local! {
    /// Allocations made by this thread (only the measuring thread reads it).
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

fn bump() {
    // `try_with`: the allocator may run while thread-local storage is being torn down.
    let _ = ALLOCS.try_with(|a| a.set(a.get() + 1));
}

// SAFETY: every method forwards to `System` with the same arguments, so the `GlobalAlloc`
// contract is upheld by `System`; the counter is a thread-local `Cell` of a const-initialised
// `u64`, whose access never allocates. Exercised by every test in this file.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        bump();
        // SAFETY: forwarded unchanged; `ptr` came from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded unchanged; `ptr` came from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// Waits until the current minute has at least 20 s left, so no bucket boundary (which makes a
/// key keep its old aggregate aside) falls inside the measured loop.
fn away_from_a_minute_boundary() {
    loop {
        let ms = tally_clock::Clock::now_ms(&tally_clock::SystemClock).rem_euclid(60_000);
        if ms < 40_000 {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn record_allocates_nothing_after_warm_up() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Sealing every millisecond: the sealer drains this thread's shard many times while we
    // measure, so refilling after a drain is covered too.
    let agent = rt
        .block_on(
            Agent::builder()
                .data_dir(dir.path())
                .flush_interval(Duration::from_millis(1))
                .start(),
        )
        .unwrap();
    let customers: Vec<String> = (0..1000).map(|i| format!("customer-{i}")).collect();
    let counter = agent.counter("kept", "api_calls", &[]).unwrap();
    away_from_a_minute_boundary();
    // Warm-up: every key once, then a few more rounds so every vector reaches its size.
    for _ in 0..3 {
        for c in &customers {
            agent.record(c, "api_calls", Decimal::ONE).unwrap();
            agent
                .record_with(c, "tokens", &[("model", "gpt")], Decimal::new(15, 1))
                .unwrap();
        }
        counter.add(Decimal::ONE).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = allocs();
    let start = std::time::Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        for c in &customers {
            agent.record(c, "api_calls", Decimal::ONE).unwrap();
            agent
                .record_with(c, "tokens", &[("model", "gpt")], Decimal::new(15, 1))
                .unwrap();
            counter.add(Decimal::TWO).unwrap();
            calls += 3;
        }
    }
    let after = allocs();
    assert!(calls > 10_000, "{calls}");
    assert_eq!(
        after - before,
        0,
        "{} allocations in {calls} calls",
        after - before
    );
    // Errors allocate nothing either.
    let before = allocs();
    for _ in 0..1000 {
        assert!(agent.record("", "api_calls", Decimal::ONE).is_err());
        assert!(
            agent
                .record("acme", "api_calls", Decimal::NEGATIVE_ONE)
                .is_err()
        );
    }
    assert_eq!(allocs() - before, 0);
    let _ = rt.block_on(agent.shutdown(Duration::from_millis(100)));
}

fn snapshot_customer(name: &str) -> tally_protocol::entitlements::CustomerEntitlements {
    use tally_protocol::bounded::BoundedVec;
    use tally_protocol::entitlements::{
        CustomerEntitlements, Enforcement, Feature, MeterLimit, Source,
    };
    use tally_protocol::names::{CustomerId, FeatureName, MeterName};
    CustomerEntitlements {
        customer: CustomerId::new(name).unwrap(),
        plan: None,
        features: BoundedVec::new(vec![Feature {
            name: FeatureName::new("gpt4").unwrap(),
            source: Source::Plan,
        }])
        .unwrap(),
        limits: BoundedVec::new(vec![MeterLimit {
            meter: MeterName::new("api_calls").unwrap(),
            included: Decimal::from(1_000_000_000),
            granted: Decimal::ZERO,
            limit: Decimal::from(1_000_000_000),
            used: Decimal::ZERO,
            enforcement: Enforcement::Soft,
            source: Source::Plan,
            period_start_ms: 0,
            period_end_ms: i64::MAX,
        }])
        .unwrap(),
    }
}

/// `check()`, `limit()` and `try_consume()` of known customers allocate nothing (issue 10),
/// allowed or denied.
#[test]
fn entitlement_calls_allocate_nothing_once_a_customer_is_known() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let customers: Vec<String> = (0..1000).map(|i| format!("customer-{i}")).collect();
    {
        // The snapshot as a restarted agent finds it on disk.
        let store = tally_agent::store::Store::open(
            &dir.path().join("agent.redb"),
            Duration::from_secs(3600),
        )
        .unwrap();
        store
            .put_entitlements(&tally_agent::entitlements::EntitlementsCache {
                version: 1,
                built_at_ms: tally_clock::Clock::now_ms(&tally_clock::SystemClock),
                customers: customers.iter().map(|c| snapshot_customer(c)).collect(),
            })
            .unwrap();
    }
    let agent = rt
        .block_on(
            Agent::builder()
                .data_dir(dir.path())
                .flush_interval(Duration::from_millis(1))
                .start(),
        )
        .unwrap();
    away_from_a_minute_boundary();
    for _ in 0..3 {
        for c in &customers {
            assert!(agent.check(c, "gpt4").allowed);
            assert!(
                agent
                    .try_consume(c, "api_calls", Decimal::ONE)
                    .unwrap()
                    .allowed
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = allocs();
    let start = std::time::Instant::now();
    let mut calls = 0u64;
    while start.elapsed() < Duration::from_millis(300) {
        for c in &customers {
            assert!(agent.check(c, "gpt4").allowed);
            assert!(!agent.check(c, "sora").allowed);
            assert!(
                agent
                    .try_consume(c, "api_calls", Decimal::ONE)
                    .unwrap()
                    .allowed
            );
            assert!(agent.limit(c, "api_calls").limit.is_some());
            calls += 4;
        }
    }
    let after = allocs();
    assert!(calls > 10_000, "{calls}");
    assert_eq!(
        after - before,
        0,
        "{} allocations in {calls} calls",
        after - before
    );
    let _ = rt.block_on(agent.shutdown(Duration::from_millis(100)));
}

//! The load generator end to end, small and bounded: a real collector process, two in-process
//! agents, one sidecar process, Stripe forwarding on, one sweep point, and the PostgreSQL
//! baseline when `TALLY_TEST_POSTGRES_URL` is set. Asserts what the generator reports is
//! real: exact ledger and Stripe totals, probes seen, every phase with events.
//! Needs the two binaries built beside the test (`cargo test --workspace` builds them).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;
use tally_benches::harness::find_bin;
use tally_benches::load::{Config, run, table, workload::Workload};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_reports_exact_totals_and_every_phase() {
    let postgres_url = std::env::var("TALLY_TEST_POSTGRES_URL").ok();
    if postgres_url.is_none() {
        println!("TALLY_TEST_POSTGRES_URL unset: the baseline phase is skipped");
    }
    let cfg = Config {
        collector_bin: find_bin("tally-collector").unwrap(),
        agent_bin: find_bin("tally-agent").unwrap(),
        workload: Workload {
            customers: 20,
            meters: 2,
            dimensions: 2,
        },
        agents: 2,
        threads: 2,
        sidecars: 1,
        clients: 4,
        rate: 0,
        duration: Duration::from_secs(1),
        flush: Duration::from_millis(100),
        batches: vec![1, 10],
        stripe: true,
        postgres_url: postgres_url.clone(),
        sweep: vec![0.1],
        sweep_duration: Duration::from_secs(1),
        collector_log: None,
    };
    let r = run(&cfg).await.unwrap();
    println!("{}", table(&r));
    assert!(r.ledger_exact, "ledger totals differ from the events sent");
    assert_eq!(
        r.stripe_exact,
        Some(true),
        "Stripe totals differ from the ledger"
    );
    assert!(r.in_process.events > 0 && r.in_process.record_to_ledger_ms.count > 0);
    assert!(
        r.in_process
            .ledger_to_stripe_ms
            .as_ref()
            .is_some_and(|p| p.count > 0)
    );
    assert_eq!(r.sweep.len(), 1);
    assert!(r.sweep[0].events > 0);
    assert_eq!(r.sidecar.len(), 2);
    assert!(r.sidecar.iter().all(|s| s.events > 0));
    if postgres_url.is_some() {
        assert_eq!(r.baseline.len(), 2);
        assert!(
            r.baseline.iter().all(|b| b.exact && b.events > 0),
            "{:?}",
            r.baseline
        );
        assert_eq!(r.ratios.len(), 3);
    }
}

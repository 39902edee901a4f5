//! The process-level fault harness in CI: real `tally-collector` and `tally-agent` processes
//! behind a lossy UDP relay, SIGKILLed at random, the collector down for 40 flush intervals
//! while two agents run out of disk budget (`block` and `reject`); exact totals at the end.
//! Needs the two binaries built beside the test (`cargo test --workspace` builds them; alone:
//! `cargo build -p tally-collector -p tally-sidecar` first).
#![allow(clippy::unwrap_used, missing_docs)]

use std::time::Duration;
use tally_benches::harness::{Config, find_bin, proxy::Rates, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_loss_and_full_disks_lose_nothing_and_count_nothing_twice() {
    let cfg = Config {
        seed: 2026,
        duration: Duration::from_secs(8),
        rates: Rates {
            drop_ppm: 30_000,
            dup_ppm: 20_000,
            reorder_ppm: 20_000,
            delay_ms_max: 10,
        },
        flush_ms: 50,
        outage: Duration::from_millis(2_000),
        budget_bytes: 6_144,
        collector_bin: find_bin("tally-collector").unwrap(),
        agent_bin: find_bin("tally-agent").unwrap(),
    };
    let r = run(&cfg).await.unwrap();
    println!("{r:#?}");
    assert!(r.agent_kills + r.collector_kills >= 3, "{r:?}");
    assert!(
        r.datagrams.1 > 0 && r.datagrams.2 > 0,
        "the relay misbehaved: {r:?}"
    );
    assert!(
        r.rejected > 0,
        "the reject agent's budget never ran out: {r:?}"
    );
    assert!(
        r.block_over_budget,
        "the block agent's budget never ran out: {r:?}"
    );
}

//! End to end with real agents (`tally-agent`) over QUIC on loopback: three agents record a known
//! random workload (decimal quantities, many customers and meters, dimensions); one is shut down
//! mid-way and restarted from its store (its unacknowledged batches are resent); every ledger
//! total read back over the admin API is exact and the ledger verifies clean.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use tally_agent::Agent;
use tally_protocol::catalog::Aggregation;

async fn agent(env: &Env, dir: &Path) -> Agent {
    let a = Agent::builder()
        .data_dir(dir)
        .collector(env.handle.quic_addr().to_string())
        .ca_pem(env.ca_pem.clone())
        .enroll_token(env.handle.enroll_token())
        .flush_interval(Duration::from_millis(50))
        .start()
        .await
        .unwrap();
    // Not waiting for the catalog: the agent accepts records before it knows the catalog, and
    // (as of this writing) applies a catalog that arrived together with `Welcome` only when the
    // next frame arrives.
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_random_workload_is_exact() {
    let env = start().await;
    for m in ["api_calls", "tokens", "storage.gb"] {
        env.put_meter(m, Aggregation::Sum);
    }
    env.put_meter("requests", Aggregation::Count);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut agents = Vec::new();
    for d in &dirs {
        agents.push(agent(&env, d.path()).await);
    }
    let mut rng = Rng(0x00c0_ffee_1234_5678);
    let meters = ["api_calls", "tokens", "storage.gb", "requests"];
    let mut model: HashMap<(String, &str), (Decimal, u64)> = HashMap::new();
    for round in 0..6 {
        for _ in 0..500 {
            let i = rng.below(3) as usize;
            let customer = format!("cust-{}", rng.below(40));
            let meter = meters[rng.below(4) as usize];
            let q = Decimal::new(rng.below(1_000_000) as i64, rng.below(4) as u32);
            let model_q = if meter == "requests" { Decimal::ONE } else { q };
            match rng.below(3) {
                0 => agents[i].record(&customer, meter, q).unwrap(),
                1 => agents[i]
                    .record_with(&customer, meter, &[("model", "small")], q)
                    .unwrap(),
                _ => agents[i]
                    .record_with(&customer, meter, &[("model", "large"), ("region", "eu")], q)
                    .unwrap(),
            }
            let e = model.entry((customer, meter)).or_default();
            e.0 += model_q;
            e.1 += 1;
        }
        if round == 2 {
            // Agent 0 shuts down (seals and ships) and restarts from its store.
            let a0 = agents.remove(0);
            a0.shutdown(Duration::from_secs(10)).await.unwrap();
            drop(a0);
            agents.insert(0, agent(&env, dirs[0].path()).await);
        }
    }
    for a in &agents {
        a.flush(Duration::from_secs(20)).await.unwrap();
    }
    for ((customer, meter), (qty, events)) in &model {
        let path = format!("/v1/usage?customer={customer}&meter={meter}");
        let (s, v) = env.admin("GET", &path, None).await;
        assert_eq!(s, 200, "{v}");
        let got: Decimal = v["quantity"].as_str().unwrap().parse().unwrap();
        assert_eq!(got, *qty, "{customer} {meter}");
        assert_eq!(v["events"].as_u64(), Some(*events), "{customer} {meter}");
    }
    let (_, v) = env.admin("GET", "/v1/ledger/verify", None).await;
    assert_eq!(v["ok"], true, "{v}");
    for a in agents {
        a.shutdown(Duration::from_secs(5)).await.unwrap();
    }
    env.handle.shutdown().await;
}

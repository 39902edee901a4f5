//! `tally-collector dev` in-process: init on first start, the sample catalog, the in-process
//! agent over real QUIC recording usage that lands in the ledger, graceful shutdown, restart;
//! with Orb and Metronome keys, the agent's usage reaches both (local fakes) exactly.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use rust_decimal::Decimal;
use std::time::Duration;
use tally_collector::dev::{self, DevOptions};

/// Waits (up to 5 s) until the in-process agent has the dev catalog's `api_calls`.
async fn wait_for_catalog(agent: &tally_agent::Agent) {
    for _ in 0..100 {
        if agent
            .catalog()
            .is_some_and(|c| c.meter("api_calls").is_some())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_runs_collector_catalog_and_agent_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let opts = DevOptions::ephemeral(dir.path().join("tally-dev"));
    let d = dev::start(&opts).await.unwrap();
    let agent = d.agent.as_ref().expect("the in-process agent runs");
    // Wait until the agent has the catalog, then record and flush.
    wait_for_catalog(agent).await;
    agent
        .record("acme", "api_calls", Decimal::new(15, 1))
        .unwrap();
    agent
        .record("acme", "api_calls", Decimal::new(25, 1))
        .unwrap();
    agent.flush(Duration::from_secs(10)).await.unwrap();
    let addr = d.collector.http_addr();
    let token = d.collector.admin_token().to_owned();
    let (s, body) = common::http(
        addr,
        "GET",
        "/v1/usage?customer=acme&meter=api_calls",
        Some(&token),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["quantity"], "4.0", "{v}");
    assert_eq!(v["events"], 2);
    let (_, body) = common::http(addr, "GET", "/v1/meters", Some(&token), None).await;
    let meters: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(meters["data"].as_array().unwrap().len(), 2);
    assert!(d.collector.shared().verify().unwrap().ok);
    d.shutdown().await;

    // A second start reuses everything: same token, catalog not bumped, usage kept.
    let token_before = token;
    let d = dev::start(&opts).await.unwrap();
    assert_eq!(d.collector.admin_token(), token_before);
    assert_eq!(d.collector.shared().store.catalog().unwrap().version, 2);
    let (_, body) = common::http(
        d.collector.http_addr(),
        "GET",
        "/v1/usage?customer=acme&meter=api_calls",
        Some(&token_before),
        None,
    )
    .await;
    assert!(body.contains("\"4.0\""), "{body}");
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_forwards_to_orb_and_metronome_when_their_keys_are_set() {
    use tally_forward::ApiKey;
    use tally_forward::ledger_feed::fake::FakeDest;
    use tally_forward::ledger_feed::{DestinationConfig, Engine};
    let orb = FakeDest::start(Engine::Orb, "orb_test_dev").await.unwrap();
    let met = FakeDest::start(Engine::Metronome, "met_dev").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = DevOptions::ephemeral(dir.path().join("tally-dev"));
    opts.forward.orb = Some(DestinationConfig::new(
        Engine::Orb,
        ApiKey::new("orb_test_dev"),
        Some(orb.url()),
    ));
    opts.forward.metronome = Some(DestinationConfig::new(
        Engine::Metronome,
        ApiKey::new("met_dev"),
        Some(met.url()),
    ));
    let d = dev::start(&opts).await.unwrap();
    let agent = d.agent.as_ref().expect("the in-process agent runs");
    wait_for_catalog(agent).await;
    agent
        .record("acme", "api_calls", Decimal::new(1_234, 3))
        .unwrap();
    agent
        .record("acme", "api_calls", Decimal::new(5, 3))
        .unwrap();
    agent.flush(Duration::from_secs(10)).await.unwrap();
    let want = Decimal::new(1_239, 3);
    let total = |f: &FakeDest| -> Decimal { f.totals().values().copied().sum() };
    for _ in 0..200 {
        if total(&orb) == want && total(&met) == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(total(&orb), want);
    assert_eq!(total(&met), want);
    d.shutdown().await;
}

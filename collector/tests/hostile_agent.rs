//! An agent with a valid key cannot grow the collector without bound by choosing epochs: past
//! `MAX_EPOCHS_PER_AGENT` a batch that opens one more is refused with `too_many_epochs`, nothing
//! of it is written, and the epochs it already has keep working.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use tally_collector::core::ingest::MAX_EPOCHS_PER_AGENT;
use tally_protocol::catalog::Aggregation;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{AckOutcome, Frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_per_agent_are_capped_and_the_refusal_writes_nothing() {
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(9);
    let d = || {
        vec![delta(
            "acme",
            "api_calls",
            &[],
            1_763_000_000_000,
            Decimal::ONE,
            1,
        )]
    };
    let mut c = env.client(&k).await;
    for epoch in 1..=MAX_EPOCHS_PER_AGENT as u64 {
        let reply = send(&mut c, &seal(&k, epoch, 1, d())).await;
        assert!(
            matches!(&reply, Frame::Ack(a) if a.outcome == AckOutcome::Committed),
            "epoch {epoch}: {reply:?}"
        );
    }
    let reply = send(&mut c, &seal(&k, 1_000_000, 1, d())).await;
    assert!(
        matches!(&reply, Frame::Error(e) if e.code == ErrorCode::TooManyEpochs),
        "{reply:?}"
    );
    let epochs = env.handle.shared().store.epochs().unwrap();
    assert_eq!(
        epochs.len(),
        MAX_EPOCHS_PER_AGENT,
        "no dedup row for the refused epoch"
    );
    // The refused batch left no usage behind; an existing epoch still commits.
    let (_, v) = env
        .admin(
            "GET",
            "/v1/usage?customer=acme&meter=api_calls&period=2025-11",
            None,
        )
        .await;
    assert_eq!(v["quantity"], MAX_EPOCHS_PER_AGENT.to_string(), "{v}");
    let mut c = env.client(&k).await;
    let reply = send(&mut c, &seal(&k, 3, 2, d())).await;
    assert!(matches!(reply, Frame::Ack(a) if a.outcome == AckOutcome::Committed));
    env.assert_verified();
    env.handle.shutdown().await;
}

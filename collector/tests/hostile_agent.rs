//! An agent with a valid key cannot grow the collector without bound: past
//! `MAX_EPOCHS_PER_AGENT` a batch that opens one more epoch is refused with `too_many_epochs`,
//! past `MAX_GAPS` one that opens one more gap is refused with `too_many_gaps`; nothing of a
//! refused batch is written, what the agent already has keeps working, the dedup state stays
//! under its documented size, the process's memory stays flat under more hostile traffic, and
//! the connections it opened and closed are forgotten.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use tally_collector::core::dedup::MAX_GAPS;
use tally_collector::core::ingest::MAX_EPOCHS_PER_AGENT;
use tally_collector::testkit::TestClient;
use tally_protocol::catalog::Aggregation;
use tally_protocol::error::ErrorCode;
use tally_protocol::frame::{AckOutcome, Frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn epochs_per_agent_are_capped_and_the_refusal_writes_nothing() {
    let _serial = SERIAL.lock().await;
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

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Resident memory of this process, KiB (Linux).
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_per_epoch_are_capped_and_memory_stays_flat() {
    // Alone in the process: it measures the process's memory.
    let _serial = SERIAL.lock().await;
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(10);
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
    // Every even seq: each opens a gap below it. Sent a window at a time.
    let evens: Vec<u64> = (1..=MAX_GAPS as u64).map(|i| 2 * i).collect();
    let mut c = env.client(&k).await;
    for window in evens.chunks(32) {
        for &seq in window {
            c.send(&Frame::Batch(seal(&k, 1, seq, d()))).await.unwrap();
        }
        for &seq in window {
            let reply = c.next_reply().await.unwrap();
            assert!(
                matches!(&reply, Frame::Ack(a) if a.seq == seq && a.outcome == AckOutcome::Committed),
                "seq {seq}: {reply:?}"
            );
        }
    }
    let gap_opener = 2 * MAX_GAPS as u64 + 2;
    let reply = send(&mut c, &seal(&k, 1, gap_opener, d())).await;
    assert!(
        matches!(&reply, Frame::Error(e) if e.code == ErrorCode::TooManyGaps),
        "{reply:?}"
    );
    let state = |env: &Env| {
        let epochs = env.handle.shared().store.epochs().unwrap();
        let e = epochs.iter().find(|e| e.agent == agent_id(&k)).unwrap();
        e.dedup.clone()
    };
    let s = state(&env);
    assert_eq!(s.gaps(), MAX_GAPS);
    let bytes = postcard::to_allocvec(&s).unwrap().len();
    assert!(bytes < 17 * 1024, "a full dedup row is {bytes} bytes");

    // More hostile traffic, all refused: gap openers and new epochs (the agent has one epoch
    // here; fill the rest first). The refusal closed the connection.
    let mut c = env.client(&k).await;
    for epoch in 2..=MAX_EPOCHS_PER_AGENT as u64 {
        let reply = send(&mut c, &seal(&k, epoch, 1, d())).await;
        assert!(matches!(&reply, Frame::Ack(_)), "epoch {epoch}: {reply:?}");
    }
    c.close().await;
    // Two rounds of refused traffic: the first warms the allocator and the connection
    // machinery up; the second must leave memory where the first left it.
    let hostile_round = |round: u64| {
        let (env, k) = (&env, &k);
        async move {
            for i in 0..100u64 {
                let mut c = env.client(k).await;
                let n = round * 1_000 + i;
                let batch = if i % 2 == 0 {
                    seal(k, 1, gap_opener + 2 * n, d())
                } else {
                    seal(k, 10_000 + n, 1, d())
                };
                let reply = send(&mut c, &batch).await;
                assert!(matches!(&reply, Frame::Error(_)), "{n}: {reply:?}");
            }
        }
    };
    hostile_round(0).await;
    let before = rss_kib();
    hostile_round(1).await;
    let after = rss_kib();
    // A leak per refused batch or connection would grow by megabytes a round; the allocator's
    // arenas move by a few (6 MiB seen in CI), so the bound leaves room for them.
    assert!(
        after < before + 16 * 1024,
        "memory grew from {before} KiB to {after} KiB under refused traffic"
    );
    assert_eq!(state(&env), s, "refused batches changed nothing");
    assert_eq!(
        env.handle.shared().store.epochs().unwrap().len(),
        MAX_EPOCHS_PER_AGENT
    );

    // Filling a gap merges two runs: the agent can always make progress downwards.
    let mut c = env.client(&k).await;
    let reply = send(&mut c, &seal(&k, 1, 3, d())).await;
    assert!(matches!(&reply, Frame::Ack(a) if a.outcome == AckOutcome::Committed));
    assert_eq!(state(&env).gaps(), MAX_GAPS - 1);
    c.close().await;

    // Ended connections are forgotten: nothing stays in memory for an agent that is gone.
    let registry = env.handle.shared().registry.clone();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while registry.live_agents() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} agents still remembered as live",
            registry.live_agents()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    env.assert_verified();
    env.handle.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_rate_are_refused_before_any_work() {
    let _serial = SERIAL.lock().await;
    let env = start_with(|c| c.max_handshakes_per_s = 3).await;
    let k = key(11);
    // All ten at once, so the bucket (3 a second, a burst of 3) cannot refill between them
    // however slow the machine is; and the bound counts any refill during the attempts.
    let started = std::time::Instant::now();
    let attempts = (0..10).map(|_| {
        TestClient::connect(
            env.handle.quic_addr(),
            &env.ca_pem,
            &k,
            Some(env.handle.enroll_token()),
        )
    });
    let results = futures::future::join_all(attempts).await;
    let elapsed = started.elapsed().as_secs_f64();
    let mut accepted = 0;
    for c in results.into_iter().flatten() {
        accepted += 1;
        c.close().await;
    }
    let bound = 3 + (3.0 * elapsed).ceil() as usize;
    assert!(
        accepted <= bound && accepted < 10,
        "{accepted} of 10 accepted in {elapsed:.2} s at 3 a second (at most {bound})"
    );
    let token = env.handle.admin_token().to_owned();
    let (_, metrics) = env.http("GET", "/metrics", Some(&token), None).await;
    assert!(
        metrics.contains(r#"tally_collector_connections_refused_total{result="handshake_rate"}"#),
        "{metrics}"
    );
    // The bucket refills: a well-behaved agent that backs off gets in.
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    env.client(&k).await.close().await;
    env.handle.shutdown().await;
}

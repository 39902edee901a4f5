//! The agent's public API without a collector: event-id dedup on disk across restarts, the
//! disk budget and overflow policies, shutdown, status and metrics.
#![allow(clippy::unwrap_used)]

use std::time::Duration;
use tally_agent::{Agent, Event, Overflow, RecordError, Recorded};
use tally_protocol::Decimal;

async fn offline(dir: &std::path::Path) -> Agent {
    Agent::builder()
        .data_dir(dir)
        .flush_interval(Duration::from_millis(10))
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn event_ids_are_counted_once_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a = offline(dir.path()).await;
    let ev = |id: &str| Event::new("acme", "api_calls", Decimal::ONE).with_id(id);
    assert_eq!(a.record_event(ev("a")).unwrap(), Recorded::New);
    assert_eq!(a.record_event(ev("a")).unwrap(), Recorded::Duplicate);
    assert_eq!(
        a.record_durable(ev("a")).await.unwrap(),
        Recorded::Duplicate
    );
    assert_eq!(a.record_durable(ev("b")).await.unwrap(), Recorded::New);
    assert_eq!(a.record_event(ev("b")).unwrap(), Recorded::Duplicate);
    // "c" is only in the durable log (not sealed) when the agent stops.
    a.seal().await.unwrap();
    assert_eq!(a.record_durable(ev("c")).await.unwrap(), Recorded::New);
    let _ = a.shutdown(Duration::from_millis(10)).await;
    drop(a);
    let a = offline(dir.path()).await;
    for id in ["a", "b", "c"] {
        assert_eq!(a.record_event(ev(id)).unwrap(), Recorded::Duplicate, "{id}");
        assert_eq!(a.record_durable(ev(id)).await.unwrap(), Recorded::Duplicate);
    }
    assert_eq!(a.record_event(ev("d")).unwrap(), Recorded::New);
    assert!(matches!(
        a.record_event(ev("")),
        Err(RecordError::InvalidEventId)
    ));
    assert!(matches!(
        a.record_event(ev(&"x".repeat(257))),
        Err(RecordError::InvalidEventId)
    ));
}

#[tokio::test]
async fn reject_over_the_disk_budget_then_recover() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::builder()
        .data_dir(dir.path())
        .flush_interval(Duration::from_millis(10))
        .disk_budget(1)
        .overflow(Overflow::Reject)
        .start()
        .await
        .unwrap();
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    a.seal().await.unwrap();
    let s = a.status();
    assert!(
        s.over_budget && s.backlog_batches == 1 && s.backlog_bytes > 0,
        "{s:?}"
    );
    assert_eq!(
        a.record("acme", "api_calls", Decimal::ONE),
        Err(RecordError::OverBudget)
    );
    assert!(matches!(
        a.record_durable(Event::new("acme", "api_calls", Decimal::ONE))
            .await,
        Err(RecordError::OverBudget)
    ));
    let m = a.render_metrics();
    assert!(
        m.contains("tally_agent_record_errors_total{reason=\"over_budget\"} 2"),
        "{m}"
    );
    assert!(m.contains("tally_agent_backlog_batches 1"), "{m}");
}

#[tokio::test]
async fn block_waits_for_room_and_keeps_aggregating() {
    let dir = tempfile::tempdir().unwrap();
    let a = Agent::builder()
        .data_dir(dir.path())
        .flush_interval(Duration::from_millis(10))
        .disk_budget(1)
        .overflow(Overflow::Block)
        .start()
        .await
        .unwrap();
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    a.seal().await.unwrap();
    assert!(a.status().over_budget);
    // record() still works (in memory); record_durable waits.
    a.record("acme", "api_calls", Decimal::ONE).unwrap();
    let waiting = tokio::time::timeout(
        Duration::from_millis(100),
        a.record_durable(Event::new("acme", "api_calls", Decimal::ONE)),
    )
    .await;
    assert!(waiting.is_err(), "record_durable should wait for room");
    // The periodic sealer holds off while over budget.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(a.status().backlog_batches, 1);
}

#[tokio::test]
async fn shutdown_closes_every_clone_and_keeps_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let a = offline(dir.path()).await;
    let b = a.clone();
    a.record("acme", "api_calls", Decimal::new(5, 1)).unwrap();
    a.record_durable(Event::new("acme", "api_calls", Decimal::ONE))
        .await
        .unwrap();
    // Usage from memory and from the durable log are sealed into separate batches.
    let r = a.shutdown(Duration::from_millis(50)).await;
    assert!(matches!(
        r,
        Err(tally_agent::ShutdownError::Unacked { unacked: 2 })
    ));
    assert_eq!(
        b.record("acme", "api_calls", Decimal::ONE),
        Err(RecordError::Closed)
    );
    assert!(matches!(
        b.record_durable(Event::new("acme", "api_calls", Decimal::ONE))
            .await,
        Err(RecordError::Closed)
    ));
    drop((a, b));
    let a = offline(dir.path()).await;
    let s = a.status();
    assert_eq!((s.backlog_batches, s.last_sealed_seq), (2, 2), "{s:?}");
    assert_eq!(s.durable_log_events, 0);
}

#[tokio::test]
async fn counters_and_typed_errors_show_in_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let a = offline(dir.path()).await;
    let c = a.counter("acme", "api_calls", &[("region", "eu")]).unwrap();
    for _ in 0..10 {
        c.add(Decimal::ONE).unwrap();
    }
    assert_eq!(
        c.add(Decimal::NEGATIVE_ONE),
        Err(RecordError::NegativeQuantity)
    );
    assert!(matches!(
        a.record("acme", "Bad Meter", Decimal::ONE),
        Err(RecordError::InvalidMeter(_))
    ));
    assert!(matches!(
        a.record_with(
            "acme",
            "m",
            &[("a", "1"), ("b", "1"), ("c", "1"), ("d", "1"), ("e", "1")],
            Decimal::ONE
        ),
        Err(RecordError::InvalidDimensions(_))
    ));
    assert!(a.counter("", "m", &[]).is_err());
    let m = a.render_metrics();
    assert!(m.contains("tally_agent_records_total 10"), "{m}");
    assert!(m.contains("reason=\"negative_quantity\"} 1"), "{m}");
    assert!(m.contains("reason=\"invalid_meter\"} 1"), "{m}");
    assert!(m.contains("reason=\"invalid_dimensions\"} 1"), "{m}");
    assert!(m.contains("tally_agent_ship_rtt_seconds_bucket"), "{m}");
    assert!(
        m.contains("tally_agent_entitlements_snapshot_age_seconds -1"),
        "{m}"
    );
}

#[tokio::test]
async fn record_durable_all_is_one_unit() {
    let dir = tempfile::tempdir().unwrap();
    // No flush during the test: it counts what is in the durable log, which a seal folds away.
    let a = Agent::builder()
        .data_dir(dir.path())
        .flush_interval(Duration::from_secs(3600))
        .start()
        .await
        .unwrap();
    let ev = |id: &str, q: i64| Event::new("acme", "api_calls", Decimal::from(q)).with_id(id);
    // One invalid event refuses the whole request: nothing is logged.
    let bad = vec![ev("x1", 1), Event::new("acme", "Bad Meter", Decimal::ONE)];
    assert!(matches!(
        a.record_durable_all(bad).await,
        Err(RecordError::InvalidMeter(_))
    ));
    assert_eq!(a.status().durable_log_events, 0);
    assert_eq!(
        a.record_durable(ev("x1", 1)).await.unwrap(),
        Recorded::New,
        "the refused request left no id behind"
    );
    // Repeats inside a request and of earlier ids count once.
    let out = a
        .record_durable_all(vec![ev("x1", 1), ev("x2", 2), ev("x2", 2), ev("x3", 3)])
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            Recorded::Duplicate,
            Recorded::New,
            Recorded::Duplicate,
            Recorded::New
        ]
    );
    assert_eq!(a.status().durable_log_events, 3);
    assert_eq!(a.record_durable_all(Vec::new()).await.unwrap(), Vec::new());
}

#[tokio::test]
async fn wall_time_comes_from_the_injected_clock() {
    let dir = tempfile::tempdir().unwrap();
    let t0 = 1_700_000_000_000;
    let clock = tally_clock::ManualClock::new(t0);
    let a = Agent::builder()
        .data_dir(dir.path())
        .flush_interval(Duration::from_secs(3600))
        .clock(std::sync::Arc::new(clock.clone()))
        .start()
        .await
        .unwrap();
    assert_eq!(a.clock().now_ms(), t0);
    // An event without a time is stamped with the injected clock, and sealed on it.
    a.record_durable(Event::new("acme", "api_calls", Decimal::ONE))
        .await
        .unwrap();
    a.seal().await.unwrap();
    assert_eq!(
        a.status().oldest_unacked_age,
        Some(Duration::ZERO),
        "sealed at the virtual time"
    );
    clock.advance_ms(600_000);
    assert_eq!(
        a.status().oldest_unacked_age,
        Some(Duration::from_secs(600))
    );
    let _ = a.shutdown(Duration::from_millis(10)).await;
}

/// The sealer's and the durable log's queues are bounded: callers past the limit wait for room
/// (backpressure) and every one of them completes; none gets an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_past_the_queue_limits_wait_and_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let a = offline(dir.path()).await;
    let mut tasks = Vec::new();
    for i in 0..tally_agent::DURABLE_QUEUE + 500 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            a.record_durable(Event::new("acme", "api_calls", Decimal::ONE).with_id(format!("e{i}")))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }));
    }
    for i in 0..tally_agent::SEAL_QUEUE * 3 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                a.seal().await.map(|_| ()).map_err(|e| e.to_string())
            } else {
                a.record_durable(Event::new("acme", "api_calls", Decimal::ONE))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("a caller past the limit waits, then completes")
            .unwrap()
            .unwrap();
    }
    a.seal().await.unwrap();
    assert_eq!(a.status().durable_log_events, 0);
    let n = tally_agent::DURABLE_QUEUE as u64 + 500 + tally_agent::SEAL_QUEUE as u64 * 3 / 2;
    assert!(
        a.render_metrics()
            .contains(&format!("tally_agent_records_total {n}")),
        "{}",
        a.render_metrics()
    );
    let _ = a.shutdown(Duration::from_millis(10)).await;
}

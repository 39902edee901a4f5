//! An agent process killed with SIGKILL and restarted: sealed batches are resent and nothing
//! `record_durable` acknowledged is lost (SPEC A1, A2).
//!
//! The test re-executes its own binary with `TALLY_AGENT_KILL_CHILD=<data dir>`; in that mode the
//! test body is the child: an offline agent that seals usage, then calls `record_durable` in a
//! loop and prints a line after each acknowledged call, until the parent kills it.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use tally_agent::{Agent, Event, Recorded};
use tally_protocol::Decimal;

const CHILD_ENV: &str = "TALLY_AGENT_KILL_CHILD";
const SEALED_EVENTS: i64 = 1000;
const DURABLE_BEFORE_KILL: usize = 300;

fn child(dir: &str) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let agent = Agent::builder()
            .data_dir(dir)
            .flush_interval(Duration::from_millis(10))
            .start()
            .await
            .unwrap();
        for i in 0..SEALED_EVENTS {
            agent
                .record("sealed", "api_calls", Decimal::new(i, 2))
                .unwrap();
        }
        let seq = agent.seal().await.unwrap();
        let mut out = std::io::stdout().lock();
        writeln!(out, "sealed {seq}").unwrap();
        out.flush().unwrap();
        // Concurrent durable callers, each printing after its call returned.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for w in 0..8 {
            let agent = agent.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    let customer = format!("d{w}-{i}");
                    let r = agent
                        .record_durable(Event::new(&customer, "api_calls", Decimal::ONE))
                        .await
                        .unwrap();
                    assert_eq!(r, Recorded::New);
                    // Some usage that may be lost: at most a flush interval of it.
                    agent.record("volatile", "api_calls", Decimal::ONE).unwrap();
                    if tx.send(customer).is_err() {
                        return;
                    }
                }
            });
        }
        while let Some(c) = rx.recv().await {
            writeln!(out, "durable {c}").unwrap();
            out.flush().unwrap();
        }
    });
}

#[test]
fn sigkill_then_restart_resends_sealed_batches_and_loses_no_durable_event() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        child(&dir);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut proc = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigkill_then_restart_resends_sealed_batches_and_loses_no_durable_event",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(proc.stdout.take().unwrap()).lines();
    let mut sealed_seq = None;
    let mut durable = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while durable.len() < DURABLE_BEFORE_KILL && std::time::Instant::now() < deadline {
        let Some(line) = lines.next() else { break };
        let line = line.unwrap();
        // The harness may print its own text before ours on the first line.
        if let Some(at) = line.find("sealed ") {
            sealed_seq = Some(line[at + 7..].trim().parse::<u64>().unwrap());
        } else if let Some(c) = line.strip_prefix("durable ") {
            durable.push(c.to_string());
        }
    }
    // SIGKILL: no destructor, no final seal, no graceful anything.
    proc.kill().unwrap();
    let status = proc.wait().unwrap();
    assert!(!status.success());
    assert_eq!(sealed_seq, Some(1), "the child did not seal");
    assert_eq!(
        durable.len(),
        DURABLE_BEFORE_KILL,
        "the child did not get far enough"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let standin = common::StandIn::start(common::Faults::default()).await;
        let agent = Agent::builder()
            .data_dir(dir.path())
            .collector(standin.address())
            .ca_pem(standin.ca_pem.clone())
            .flush_interval(Duration::from_millis(20))
            .start()
            .await
            .unwrap();
        let before = agent.status();
        assert!(before.backlog_batches >= 1, "{before:?}");
        assert!(before.durable_log_events > 0, "{before:?}");
        agent.flush(Duration::from_secs(60)).await.unwrap();
        let totals: HashMap<_, _> = standin.seen.lock().unwrap().totals.clone();
        // The batch sealed before the kill arrived whole.
        let expected: Decimal = (0..SEALED_EVENTS).map(|i| Decimal::new(i, 2)).sum();
        assert_eq!(
            totals[&("sealed".to_string(), "api_calls".to_string())],
            (expected, SEALED_EVENTS as u64)
        );
        // Every acknowledged durable event arrived exactly once.
        for c in &durable {
            assert_eq!(
                totals.get(&(c.clone(), "api_calls".to_string())),
                Some(&(Decimal::ONE, 1)),
                "durable event {c}"
            );
        }
        // Nothing arrived twice.
        for ((c, _), (_, n)) in &totals {
            if c.starts_with('d') {
                assert_eq!(*n, 1, "{c}");
            }
        }
        agent.shutdown(Duration::from_secs(5)).await.unwrap();
    });
}

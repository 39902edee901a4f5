//! Graceful shutdown commits what was received before acking and exiting; `tally-collector
//! ledger verify` exits 0 on a clean ledger and non-zero on a tampered one.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::process::Command;
use tally_collector::core::ledger::Transfer;
use tally_collector::store::Store;
use tally_collector::store::redb::RedbStore;
use tally_collector::{Collector, CollectorConfig};
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::{AckOutcome, Frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_acks_of_received_batches() {
    let env = start().await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(30);
    let mut c = env.client(&k).await;
    let n = 30u64;
    for seq in 1..=n {
        let deltas = (0..200)
            .map(|i| {
                delta(
                    &format!("c{i}"),
                    "api_calls",
                    &[],
                    1_763_000_000_000,
                    Decimal::ONE,
                    1,
                )
            })
            .collect();
        c.send(&Frame::Batch(seal(&k, 1, seq, deltas)))
            .await
            .unwrap();
    }
    let dir = env.dir.path().to_path_buf();
    let handle = env.handle;
    let stopping = tokio::spawn(handle.shutdown());
    let mut acked = Vec::new();
    let mut ended_with = None;
    while let Ok(f) = c.next_reply().await {
        match f {
            Frame::Ack(a) => {
                assert_eq!(a.outcome, AckOutcome::Committed);
                acked.push(a.seq);
            }
            Frame::Error(e) => {
                ended_with = Some(e.code);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    stopping.await.unwrap();
    // Acks are in order and every acked batch is durable after the restart.
    assert_eq!(acked, (1..=acked.len() as u64).collect::<Vec<_>>());
    if acked.len() < n as usize {
        assert_eq!(
            ended_with,
            Some(tally_protocol::error::ErrorCode::ShuttingDown)
        );
    }
    let store = RedbStore::open(&dir.join("collector.redb")).unwrap();
    let state = store.epochs().unwrap();
    assert!(state[0].dedup.watermark >= acked.len() as u64);
    assert!(store.verify().unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_verify_command_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_tally-collector");
    let out = Command::new(bin)
        .args(["init", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let handle = Collector::start(CollectorConfig::ephemeral(dir.path()))
        .await
        .unwrap();
    handle
        .shared()
        .put_meter(&meter("api_calls", Aggregation::Sum))
        .unwrap();
    let ca = std::fs::read(&handle.files().ca_pem).unwrap();
    let k = key(31);
    let mut c = tally_collector::testkit::TestClient::connect(
        handle.quic_addr(),
        &ca,
        &k,
        Some(handle.enroll_token()),
    )
    .await
    .unwrap();
    let b = seal(
        &k,
        1,
        1,
        vec![delta(
            "acme",
            "api_calls",
            &[],
            1_763_000_000_000,
            Decimal::TEN,
            1,
        )],
    );
    assert!(matches!(send(&mut c, &b).await, Frame::Ack(_)));
    handle.shutdown().await;

    let verify = || {
        Command::new(bin)
            .env("TALLY_DATA_DIR", dir.path())
            .args(["ledger", "verify"])
            .output()
            .unwrap()
    };
    let ok = verify();
    assert!(ok.status.success(), "{ok:?}");
    assert!(String::from_utf8_lossy(&ok.stdout).contains("\"ok\": true"));

    // Tamper with a transfer's amount behind the ledger's back.
    {
        let db = redb::Database::create(dir.path().join("collector.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("transfers");
            let mut t = txn.open_table(def).unwrap();
            let bytes = redb::ReadableTable::get(&t, 1)
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            let mut tr: Transfer = postcard::from_bytes(&bytes).unwrap();
            tr.amount += Decimal::ONE;
            t.insert(1, postcard::to_stdvec(&tr).unwrap().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let bad = verify();
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stdout).contains("\"ok\": false"));
}

/// Runs `tally-collector run` with stderr to a pipe until it has started; returns its stderr.
fn logs_of_a_run(extra_env: &[(&str, &str)]) -> Vec<u8> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    tally_collector::init(dir.path(), &[]).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tally-collector"));
    cmd.args(["run", "--quic", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .env_remove("TALLY_LOG_FORMAT")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("collector:"), "{line}");
    child.kill().unwrap();
    let mut err = Vec::new();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    let _ = child.wait();
    err
}

#[test]
fn logs_to_a_pipe_have_no_colour_and_json_lines_parse() {
    let text = logs_of_a_run(&[]);
    assert!(
        String::from_utf8_lossy(&text).contains("collector started"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    assert!(!text.contains(&0x1b), "an ANSI escape reached a pipe");
    let json = logs_of_a_run(&[("TALLY_LOG_FORMAT", "json")]);
    let json = String::from_utf8(json).unwrap();
    let mut lines = 0;
    for l in json.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v.get("level").is_some(), "{l}");
        lines += 1;
    }
    assert!(lines > 0, "no log lines");
    assert!(json.contains("collector started"));
}

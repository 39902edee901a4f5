//! The analytics export on PostgreSQL (decision 0098), when `TALLY_TEST_POSTGRES_URL` is set
//! (otherwise the test prints that it skipped): collectors sharing a database take turns on an
//! export directory through a claim in the database (one exporter at a time, another takes
//! over once a holder's claim lapses), and `tally-collector export --ledger-url` exports the
//! shared ledger, refusing while a collector holds the directory.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::*;
use rust_decimal::Decimal;
use std::process::Command;
use tally_collector::export::{ExportOptions, export_claimed, read_manifest};
use tally_collector::store::Store;
use tally_collector::store::postgres::PgStore;
use tally_collector::store::postgres::testdb::TestDb;
use tally_protocol::catalog::Aggregation;
use tally_protocol::frame::{AckOutcome, Frame};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn collectors_on_one_database_take_turns_exporting_and_the_command_exports_it() {
    let Some(db) = TestDb::create(
        "collectors_on_one_database_take_turns_exporting_and_the_command_exports_it",
    ) else {
        return;
    };
    let url = db.url().to_owned();
    let env = start_with({
        let url = url.clone();
        move |c| c.ledger_url = Some(url)
    })
    .await;
    env.put_meter("api_calls", Aggregation::Sum);
    let k = key(61);
    let mut client = env.client(&k).await;
    for seq in 1..=5u64 {
        let b = seal(
            &k,
            1,
            seq,
            vec![delta(
                "acme",
                "api_calls",
                &[],
                1_765_000_000_000,
                Decimal::from(seq),
                1,
            )],
        );
        let Frame::Ack(a) = send(&mut client, &b).await else {
            panic!("no ack")
        };
        assert_eq!(a.outcome, AckOutcome::Committed);
    }
    env.handle.shutdown().await;

    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("shared");
    let (u2, d2) = (url.clone(), dir.clone());
    tokio::task::spawn_blocking(move || {
        let a = PgStore::open(&u2).unwrap();
        let b = PgStore::open(&u2).unwrap();
        let positions = a.entries(None, 0, 1000).unwrap().len() as u64;
        assert_eq!(positions, 5);
        let opts = ExportOptions::new(&d2);
        // A exports and keeps the claim; B finds it held and does nothing.
        let ra = export_claimed(&a, &opts, "collector-a").unwrap();
        assert!(!ra.held_by_other);
        assert_eq!((ra.rows, ra.last_position), (5, 5));
        let rb = export_claimed(&b, &opts, "collector-b").unwrap();
        assert!(rb.held_by_other, "{rb:?}");
        assert_eq!(rb.rows, 0);
        // A renews its own claim.
        assert!(
            !export_claimed(&a, &opts, "collector-a")
                .unwrap()
                .held_by_other
        );
        // Once A's claim has lapsed (A is gone), B takes over.
        let later = i64::MAX / 2;
        assert!(
            b.claim(
                &format!("export:{}", d2.display()),
                "collector-b",
                later,
                later + 1
            )
            .unwrap()
        );
        assert!(
            !a.claim(
                &format!("export:{}", d2.display()),
                "collector-a",
                later,
                later + 1
            )
            .unwrap()
        );
    })
    .await
    .unwrap();

    // The command refuses the directory B holds, and exports another one whole.
    let held = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(["export", "--ledger-url", &url, "--format", "ndjson", "--to"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!held.status.success(), "{held:?}");
    assert!(
        String::from_utf8_lossy(&held.stderr).contains("another exporter"),
        "{held:?}"
    );
    let fresh = out.path().join("fresh");
    let ok = Command::new(env!("CARGO_BIN_EXE_tally-collector"))
        .args(["export", "--ledger-url", &url, "--format", "ndjson", "--to"])
        .arg(&fresh)
        .output()
        .unwrap();
    assert!(ok.status.success(), "{ok:?}");
    let m = read_manifest(&fresh).unwrap().unwrap();
    assert_eq!(m.last_position, 5);
    let rows: usize = walk(&fresh.join("transfers"))
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap().lines().count())
        .sum();
    assert_eq!(rows, 5);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
